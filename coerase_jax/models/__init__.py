"""The SD 1.x model stack. The only package that imports diffusers/transformers model classes."""

import logging


def quiet_library_warnings() -> None:
    """diffusers warns "Flax classes are deprecated" for every module it builds; we pin the last
    release with Flax on purpose (README), so the warning says nothing to our users."""
    import diffusers.utils.logging as diffusers_logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    diffusers_logging.set_verbosity_error()
