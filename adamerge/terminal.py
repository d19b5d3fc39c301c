"""What a run shows in the terminal: adamerge's own lines, one step bar (``progress.py``), and the libraries'
warnings only.

Lightning announces the hardware, advertises its cloud services and warns that modules are in
eval mode (the frozen base is, on purpose: dropout must stay off while coefficients are learned);
transformers draws a bar per loaded checkpoint; both emit deprecation notices meant for library
authors. ``quiet()`` keeps that chatter at warning level; ``verbose=true`` shows it all again.
"""

from __future__ import annotations

import logging
import os
import warnings

LIBRARY_LOGGERS = ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "transformers",
                   "peft", "sentence_transformers", "datasets", "huggingface_hub")

# Warnings that say nothing actionable to someone merging models.
IGNORED_WARNINGS = (
    r".*module\(s\) in eval mode.*",                # the frozen base is in eval mode by design
    r"Could not find a config file in .*",          # peft, saving an adapter of a local base
    r"The number of training batches .* is smaller than the logging interval.*",
    r".*does not have many workers which may be a bottleneck.*",  # in-memory calibration batches
)


def quiet(verbose: bool = False) -> None:
    """Libraries' info lines, progress bars and deprecation notices off (unless ``verbose``)."""
    if verbose:
        return
    quiet_loggers()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner and run summary; the run directory is printed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()  # "Loading weights: 100%|..." for every checkpoint read
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def quiet_loggers() -> None:
    """The libraries' loggers at warning level. Lightning sets its own to info when it is first imported, which
    a run that trains does after ``quiet()``: the trainer calls this again (unless ``verbose``)."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
