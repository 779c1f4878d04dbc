"""What a user sees in the terminal: memshard's own lines and progress bars, and with -v the libraries'
output too (Ray's INFO lines, MLflow's download bars, diffusers' notices, deprecation warnings).

The commands run as the user runs them, in a subprocess, against the session's Ray cluster and a
fresh MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys

from memshard.commands.cli import QUIET_ENVIRONMENT

NOISE = ("Downloading artifacts", "INFO", "WARNING", "Warning", "Loading pipeline components", "accelerate",
         "Successfully registered model")


def memshard(args: list[str], cwd, ray_cluster) -> tuple[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in QUIET_ENVIRONMENT}  # none set by the user
    env["RAY_ADDRESS"] = ray_cluster.address
    done = subprocess.run([sys.executable, "-m", "memshard.commands.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, done.stderr


def noise(out: str, err: str) -> list[str]:
    lines = (out + "\n" + err.replace("\r", "\n")).splitlines()
    return [line for line in lines if any(word in line for word in NOISE)]


def test_train_and_evaluate_show_memshards_own_lines_and_bars_and_v_shows_the_libraries(ray_cluster, tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    out, err = memshard(["train", "--preset", "tiny", "--set", f"mlflow.tracking_uri={store}"], tmp_path, ray_cluster)
    assert noise(out, err) == [] and "rounds:" in err and "model uri: models:/memshard-tiny/1" in out

    evaluate = ["evaluate", "models:/memshard-tiny/1", "--num-images", "8", "--batch", "4", "--sampling-steps", "2",
                "--tracking-uri", store]
    out, err = memshard(evaluate, tmp_path, ray_cluster)
    assert noise(out, err) == []
    assert "generating:" in err and "first batch: 4 images" in out and "MQ@0.5: " in out and "quality: " in out

    verbose_out, verbose_err = memshard(["-v", *evaluate], tmp_path, ray_cluster)
    shown = noise(verbose_out, verbose_err)
    assert any("Downloading artifacts" in line for line in shown) and any("INFO" in line for line in shown)
    assert "MQ@0.5: " in verbose_out
