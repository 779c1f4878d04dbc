"""The compare table from what evaluation runs logged: rows, cells, and notes that name the k used."""

from __future__ import annotations

from memshard.evaluation.compare import compare_row, compare_table
from memshard.evaluation.memorization import THRESHOLDS

TRAIN = {"method": "iet-agc-plus", "iet.shards": "2", "iet.rounds": "2", "iet.local_steps": "3"}


def params(k: int, **changed) -> dict[str, str]:
    logged = {"num_images": "32", "sampler": "ddim", "sampling_steps": "4", "seed": "3", "r_copy_threshold": "0.5",
              "r_neighbors": str(k), "dataset.fingerprint": "f", "feature_space": "pixels-random-projection-64"}
    return {**logged, **changed}


def metrics(copies: int) -> dict[str, float]:
    out = {f"mq_{t}_{kind}": (copies if kind == "count" else copies / 32) for t in THRESHOLDS for kind in ("count", "fraction")}
    return {**out, "nn_ratio_copy_count": 1, "nn_ratio_copy_fraction": 1 / 32, "r_copied_training_samples": copies,
            "near_copied_training_samples": copies // 2, "fid.pixels-random-projection-64": 12.5}


def test_rows_cells_and_the_k_in_the_note():
    rows = [compare_row("e1" * 16, params(20), metrics(4), "t1" * 16, "ddpm", {**TRAIN, "method": "ddpm"}),
            compare_row("e2" * 16, params(20), metrics(2), "t2" * 16, None, TRAIN)]
    assert rows[0].train_steps == 12 and rows[0].fid == 12.5 and "fid.pixels-random-projection-64" not in rows[0].metrics
    table = compare_table(rows)
    assert table.columns[-1] == "FID [pixels-random-projection-64]" and table.cells[0][-1] == "12.50"
    assert table.cells[1][table.columns.index("MQ@0.5")] == "2 (6.25%)"
    assert table.cells[0][table.columns.index("r-copied train imgs")] == "4"
    assert table.cells[0][table.columns.index("near-copied train imgs")] == "2"
    assert "mean(d1^2..d20^2) over the 20 nearest" in table.notes[0] and "d50" not in table.text()
    assert len(table.notes) == 1  # like for like
    assert "| iet-agc-plus |" in table.markdown() and table.to_json()["rows"][0]["r_neighbors"] == 20


def test_runs_that_differ_are_flagged_and_fids_of_other_spaces_kept_apart():
    rows = [compare_row("e1", params(20), metrics(1), None, "ddpm", {}),
            compare_row("e2", params(50, seed="4", feature_space="inception-v3"), metrics(1), None, "ddpm", {})]
    table = compare_table(rows)
    assert "over the k nearest" in table.notes[0]
    assert any("number of neighbours k in r differs" in note for note in table.notes)
    assert any("the seed differs" in note for note in table.notes)
    assert any("not comparable" in note for note in table.notes)
    assert table.cells[0][table.columns.index("FID [inception-v3]")] == "-"
    assert table.cells[0][table.columns.index("train steps")] == "-"


def test_evaluations_logged_before_the_r_copy_rename_read_under_todays_names():
    old_params = {key.replace("r_copy_threshold", "copy_threshold"): value for key, value in params(50).items()}
    old_metrics = {key.replace("r_copied", "copied"): value for key, value in metrics(3).items()
                   if not key.startswith("near_")}  # near copies per training image came later
    (row,) = rows = [compare_row("e1", old_params, old_metrics, None, "ddpm", {})]
    table = compare_table(rows)
    assert row.r_copy_threshold == 0.5 and "r < 0.5 has as its nearest" in table.notes[0]
    assert table.cells[0][table.columns.index("r-copied train imgs")] == "3"
    assert table.cells[0][table.columns.index("near-copied train imgs")] == "-"
