// LoRA Kit's buttons start long jobs the way A1111's own do (javascript/ui.js submit(),
// textualInversion.js): a fresh task id replaces the first input, which the Python side hands to
// wrap_gradio_gpu_call, and requestProgress() polls /internal/progress for that id and draws
// A1111's progress bar just above the job's message box (<prefix>_progress).

var lorakitTasks = {};

function lorakitClick(elemId) {
    // Hidden gradio buttons are pressed this way by A1111 itself (extraNetworks.js).
    var button = gradioApp().getElementById(elemId);
    if (button) button.dispatchEvent(new Event("click"));
}

function lorakitSubmit(prefix, args, galleryId, onProgress) {
    var id = randomId();
    lorakitTasks[prefix] = id;
    var gallery = galleryId ? gradioApp().getElementById(galleryId) : null;
    requestProgress(id, gradioApp().getElementById(prefix + "_progress"), gallery, function() {}, onProgress);
    var res = Array.from(args);
    res[0] = id;
    return res;
}

function lorakit_start_training() {
    // While the job runs, "Show progress" is pressed every few seconds so the loss curve and the
    // list of epoch files grow during the run, not only when it ends.
    var lastPoll = Date.now();
    return lorakitSubmit("lorakit_train", arguments, null, function(progress) {
        if (progress.active && Date.now() - lastPoll > 5000) {
            lastPoll = Date.now();
            lorakitClick("lorakit_train_poll");
        }
    });
}

function lorakit_train_task() {
    // The training this page started, or "" for the latest job (e.g. after a page reload).
    return [lorakitTasks["lorakit_train"] || ""];
}

function lorakit_run_captioner() {
    return lorakitSubmit("lorakit_caption", arguments);
}

function lorakit_generate_reg_images() {
    // With the gallery A1111 also shows its live previews of each image there.
    return lorakitSubmit("lorakit_reg", arguments, "lorakit_reg_gallery");
}

function lorakit_render_grid() {
    // With the grid's gallery A1111 also shows its live previews of the cells there.
    return lorakitSubmit("lorakit_grid", arguments, "lorakit_grid_gallery");
}

function lorakit_send_xyz(infotext) {
    // The hidden button carries A1111's "send to txt2img" paste binding; an empty infotext means
    // the fill failed, and pasting nothing would bring back the last generation's parameters.
    if (infotext) lorakitClick("lorakit_xyz_send");
    return [];
}
