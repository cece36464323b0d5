"""What a run prints: by default the driver's own lines and progress displays, with the
libraries' notices below warnings hidden and the workers' output left in Ray's log files
(/tmp/ray/session_latest/logs); `-v` shows everything, at debug level, less matplotlib's
font matching (a line per installed font each time a figure picks one).
"""

from __future__ import annotations

import logging
import os
import warnings

# loggers whose INFO lines are start-up chatter on every run
_LIBRARIES = ("ray", "ray.train", "ray.data", "ray.tune", "DeepSpeed", "deepspeed",
              "transformers", "torch.distributed", "filelock", "urllib3", "matplotlib",
              "faiss",  # faiss: which CPU build it loads, with the ones it could not
              "tensorboardX")  # Tune's logger: a line per metric whose name holds '@' 

_verbose = False


def configure(verbose: bool) -> None:
    """Set up this process's console before Ray, DeepSpeed or transformers start."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a report.png or a curve plot logs hundreds of font scores at debug level: noise, even in -v
    logging.getLogger("matplotlib.font_manager").setLevel(logging.INFO)
    if verbose:
        return
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # transformers' weight-loading bars and advisory notices (local mode loads in-process)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Ray's notice that a local cluster uses token authentication (it does, as it should)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


_RAY_DATA_NOTICES = ("Progress bars disabled",
                     "Specifying both num_cpus and num_gpus for map tasks is experimental")


def verbose() -> bool:
    """-v was given: workers' output reaches the driver's console too."""
    return _verbose


def quiet_ray_data() -> None:
    """Ray Data configures its own loggers on import (a file in the session's logs and the
    console, both at INFO): its console handler keeps warnings only, less two notices: that
    the progress bars this project replaces are off, and that a GPU scoring pool asks for
    CPUs too (it does on purpose: its actors build their inputs on the CPU; Ray 2.60 calls
    that experimental, ray-project/ray#47995)."""
    if _verbose:
        return
    import ray.data  # noqa: F401 - the import sets up the handlers changed here

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console; files keep INFO
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: not any(
                notice in record.getMessage() for notice in _RAY_DATA_NOTICES))
