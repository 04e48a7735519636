"""What a training run is given besides the model (:class:`TrainJob`) and what it returns
(:class:`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorakit_ext.train.data_parallel import World


@dataclass
class RunResult:
    status: str  # "finished" | "interrupted"
    files: list[Path]
    losses: list[float]
    steps: int
    run_dir: Path
    validation: list[tuple[int, int, float]] = field(default_factory=list)  # (epoch, step, loss)


@dataclass
class TrainJob:
    """Everything a run needs besides the model."""

    config: object  # TrainConfig, validated
    project: object  # Project
    output_dir: Path
    run_dir: Path
    base_model_name: str = ""
    base_model_hash: str = ""
    base_model_sha256: str = ""
    base_model_path: str = ""
    patch_attention: bool = False  # headless: give stock ldm attention an SDPA forward
    channels_last: bool | None = None  # None: on CUDA
    compile_blocks: bool = False  # regional torch.compile of the UNet's blocks (models.compiled_blocks)
    output_stem: str = ""  # the stem preflight chose (free in output_dir); empty: the output name
    # What preflight read (train.preflight.DatasetSchedule): the run trains on exactly the dataset
    # its fingerprint describes, without reading it again. None: read it at the start.
    dataset: object | None = None
    world: World = World()  # data-parallel ranks (train.data_parallel); rank 0 alone writes

    @property
    def stem(self) -> str:
        return self.output_stem or self.config.output_name or self.project.name

    @property
    def run_id(self) -> str:
        return Path(self.run_dir).name
