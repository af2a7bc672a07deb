"""The project's user-facing error type: a problem with what the user gave (an image, a file list, a config, a
weights file, an output folder). Every script's entry point (`utils.entry.run_script`) prints such an error as one
line and exits with status 2; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Its message names the file (or setting) at fault and the problem, and says what to do where that is clear."""
