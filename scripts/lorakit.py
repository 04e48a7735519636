"""A1111 runs this file at start-up (and on "Reload UI"); everything it does lives in lorakit_ext.

A1111 puts the extension folder on ``sys.path`` while it loads scripts, so the package imports
without any path handling here.
"""

from lorakit_ext.webui.entry import register

register()
