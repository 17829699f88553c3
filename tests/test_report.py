"""`kubeforge report` and the reward curve, on metrics.jsonl rows shaped like apps/grpo/main.py's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kubeforge.cli import main
from kubeforge.report import PAGE_DPI, PAGE_INCHES, plot_reward_curve, render
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def grpo_rows(steps: int = 12, eval_every: int = 5) -> list[dict]:
    """What the GRPO app writes: held-out rows at step 0 (before and after warm-up), then one
    training row per step and a held-out row every `eval_every` steps and at the end."""
    rows = [
        {"step": 0, "eval_reward": 0.0, "eval_policy_version": 0, "eval_correctness": 0.0, "eval_format": 0.0},
        {"step": 0, "warmup_steps": 20, "warmup_loss": -0.42, "policy_version": 20, "eval_reward": 0.79,
         "eval_policy_version": 20, "eval_correctness": 0.61, "eval_format": 0.88},
    ]  # fmt: skip
    for step in range(1, steps + 1):
        reward = min(1.2, 0.25 + 0.08 * step)
        rows.append(
            {"step": step, "policy_version": 20 + step, "reward_mean": reward, "correctness_mean": reward - 0.2,
             "format_mean": min(1.0, reward), "loss": -0.06, "grad_norm": 0.9, "ratio_mean": 1.0,
             "generate_seconds": 0.17, "reward_seconds": 0.009, "train_seconds": 1.27, "sync_seconds": 0.15,
             "staleness_max": step % 2, "dropped_stale": 3 if step == 4 else 0,
             "episodes": {"trained": 128 * step}, "sample": "'dbb' -> 'dbb'", "buffer_depth": 1}
        )  # fmt: skip
        if step % eval_every == 0 or step == steps:
            rows.append({"step": step, "eval_reward": reward, "eval_policy_version": 20 + step})
    return rows


def write_run(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def kubeforge(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubeforge.cli", *map(str, args)], capture_output=True, text=True)


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def panel_texts(fig) -> dict[str, list[str]]:
    return {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes}


def test_report_cli_writes_one_png_page(tmp_path):
    run = write_run(tmp_path / "grpo-tiny", grpo_rows())
    out = tmp_path / "page.png"
    result = kubeforge("report", run, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"report: {out}"
    assert png_size(out) == (PAGE_INCHES[0] * PAGE_DPI, PAGE_INCHES[1] * PAGE_DPI)
    assert out.stat().st_size > 20_000  # four drawn panels, not a blank page


def test_report_defaults_to_the_run_directory(tmp_path, capsys):
    run = write_run(tmp_path / "run", grpo_rows(steps=3))
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report.png'}"
    assert png_size(run / "report.png")[0] >= 800


def test_every_panel_has_data_for_a_full_grpo_run():
    texts = panel_texts(render(grpo_rows()))
    assert set(texts) == {
        "reward",
        "step time by stage",
        "staleness (3 samples dropped as too old)",
        "weight sync (trainer to generators)",
    }
    assert not any("no data" in t for t in texts.values())


def test_panels_without_their_keys_say_no_data():
    # An older app: no staleness keys, and a run that has only held its first evaluation.
    rows = [{"step": 0, "eval_reward": 0.1}]
    texts = panel_texts(render(rows))
    assert texts["staleness"] == ["no data"]
    assert texts["step time"] == ["no data"]
    assert texts["weight sync"] == ["no data"]
    assert texts["reward"] == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing", "no such run directory"),
        (lambda d: d, "metrics.jsonl: not found"),
        (lambda d: (d / "metrics.jsonl").write_text("\n") and d, "empty, no step recorded yet"),
        (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2\n') and d, "metrics.jsonl:2: not a JSON"),
        (lambda d: (d / "metrics.jsonl").write_text('{"reward_mean": 1}\n') and d, "an integer 'step'"),
    ],
    ids=["no-dir", "no-metrics", "empty", "bad-json", "no-step"],
)
def test_report_refuses_what_it_cannot_draw(tmp_path, capsys, setup, message):
    assert main(["report", str(setup(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert message in err and out == ""
    assert not list(tmp_path.glob("**/*.png"))


def test_report_refuses_an_output_in_a_missing_directory(tmp_path, capsys):
    run = write_run(tmp_path / "run", grpo_rows(steps=2))
    assert main(["report", str(run), "-o", str(tmp_path / "nowhere" / "page.png")]) == 1
    assert "no such directory for the report" in capsys.readouterr().err


def test_reward_curve_is_the_apps_end_of_run_plot(tmp_path):
    path = plot_reward_curve(grpo_rows(), tmp_path / "reward.png")
    assert path == tmp_path / "reward.png"
    assert png_size(path) == (600, 400)
