"""What a run prints: one progress display on the driver, the libraries' chatter hidden
(a whole run's console and trackers: tests/test_scale.py, the `ray job submit` test)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

from gensr_ray.train.progress import TrainingProgress, describe

ROOT = Path(__file__).resolve().parent.parent


def _row(step: int, **extra) -> str:
    return json.dumps({"step": step, "loss": 0.5 / step, "loss_answer": 0.4 / step,
                       "loss_contrastive": 2.0, "rows_per_s": 123.4, **extra})


def test_progress_follows_the_reports_of_this_run_only(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(_row(5) + "\n")  # an earlier attempt of the same run
    out = io.StringIO()
    with TrainingProgress(str(metrics), 40, "val/mean/NDCG@10", interval=0.05,
                          line_every=0, stream=out):
        with metrics.open("a") as f:
            f.write(_row(10) + "\n")
        time.sleep(0.3)
        with metrics.open("a") as f:
            f.write(_row(20, **{"val/mean/NDCG@10": 0.4}) + "\n" + _row(40) + "\n")
    lines = out.getvalue().splitlines()
    assert lines[0] == ("step 10/40 | loss 0.0500 (answer 0.0400, contrastive 2.0000) | "
                        "123 rows/s")
    # the validation stays on show after the report that carried it
    assert lines[-1].startswith("step 40/40") and lines[-1].endswith("val/mean/NDCG@10 0.4000 @20")
    assert not any(line.startswith("step 5") for line in lines)


def _console_stderr(verbose: bool, *calls: str) -> str:
    """What a fresh process prints after console.configure(verbose) and the logging calls."""
    code = "; ".join(["import logging", "from gensr_ray import console",
                      f"console.configure({verbose})", *calls])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stderr


def test_the_libraries_notices_are_hidden_and_the_drivers_lines_kept():
    err = _console_stderr(
        False, "logging.getLogger('tensorboardX.summary').info('Summary name a@1 is illegal')",
        "logging.getLogger('ray.tune').info('tune chatter')",
        "logging.getLogger('gensr_ray.study').info('the study line')",
        "logging.getLogger('ray.tune').warning('a real warning')")
    assert "the study line" in err and "a real warning" in err
    assert "is illegal" not in err and "tune chatter" not in err


def test_verbose_shows_debug_lines_but_not_matplotlib_font_matching():
    err = _console_stderr(
        True, "logging.getLogger('matplotlib.font_manager').debug('findfont: score 10.05')",
        "logging.getLogger('matplotlib.font_manager').warning('a font is missing')",
        "logging.getLogger('ray.tune').debug('tune detail')",
        "logging.getLogger('gensr_ray.cf.lightgcn').debug('lightgcn epoch 1/1')")
    assert "tune detail" in err and "lightgcn epoch 1/1" in err and "a font is missing" in err
    assert "findfont" not in err


def test_ray_data_s_console_keeps_its_warnings_less_two_notices():
    """Ray Data's own console handler: a GPU scoring pool's num_cpus + num_gpus notice and the
    progress-bar notice are hidden, its other warnings kept."""
    code = ("import logging; from gensr_ray import console; console.configure(False); "
            "console.quiet_ray_data(); "
            "log = logging.getLogger('ray.data._internal.execution.operators.map_operator'); "
            "log.warning('Specifying both num_cpus and num_gpus for map tasks is experimental, "
            "and may result in scheduling or stability issues.'); "
            "log.warning('Progress bars disabled. To enable, set ...'); "
            "log.warning('a real Ray Data warning')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    printed = run.stdout + run.stderr
    assert "a real Ray Data warning" in printed
    assert "num_cpus and num_gpus" not in printed and "Progress bars disabled" not in printed


def test_describe_leaves_out_what_a_report_lacks():
    assert describe({"step": 3, "loss": 0.25}, None) == "loss 0.2500"
    assert describe({"step": 3, "rows_per_s": 9.6}, ("val/rec/HR@10", 0.5, 2)) == \
        "10 rows/s | val/rec/HR@10 0.5000 @2"
