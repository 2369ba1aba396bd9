"""Silence the libraries' own weight-loading bars and notices: the job has its own progress bar."""

from __future__ import annotations


def quiet_library_logs() -> None:
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
