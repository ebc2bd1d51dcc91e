"""demo.py: the four chained stages, the report and the exports, at a few steps."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_smoke(tmp_path, monkeypatch):
  # -O0: these steps are few, so compile time dominates.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                                    "--xla_backend_optimization_level=0"}
  command = [sys.executable, "-m", "countclip_jax.demo", f"--workdir={tmp_path}", "--smoke"]
  first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)  # generous: the suite shares 2 cores with it
  assert first.returncode == 0, first.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert set(report) == {"A", "B", "C", "D"}
  for name in "ABC":
    stage = report[name]
    assert set(stage) == {"count_accuracy", "count_mae", "color_accuracy", "shape_accuracy"}
    assert all(0 <= v <= 1 for k, v in stage.items() if k != "count_mae")
  assert set(report["D"]) == {"mae", "rmse", "mean_count", "majority_mae", "minority_mae",
                              "absent_mean", "absent_mean_color_present",
                              "absent_mean_color_absent"}
  d_eval = json.loads((tmp_path / "D" / "eval" / "density_step3.json").read_text())
  assert report["D"]["mae"] == d_eval["mae"] and report["D"]["minority_mae"] == (
      d_eval["minority"]["mae"])
  text = (tmp_path / "report.md").read_text()
  assert "| B: fine-tuned with the counting loss |" in text and "curves.png" in text
  assert "| D: density counting on B's frozen backbone |" in text
  assert "(D/eval/density_step3.png)" in text and (tmp_path / "D/eval/density_step3.png").exists()
  assert (tmp_path / "curves.png").exists()
  assert (tmp_path / "B" / "hf" / "model.safetensors").exists()
  # B and C start from A's Hugging Face export, D from B's: the worked example of chaining runs.
  assert first.stdout.count(f"--config.model.init={tmp_path}/A/hf") == 2
  assert f"--config.model.init={tmp_path}/B/hf" in first.stdout
  # A second demo with the same arguments would reuse the cached stage A; other ones retrain it.
  from countclip_jax import demo
  assert demo.cached(str(tmp_path / "A"), list(demo.SMOKE))
  assert not demo.cached(str(tmp_path / "A"), [])
  # ... and so does an edited preset.
  get_config = demo.demo_config.get_config
  edited = get_config("pretrain")
  edited.train.steps += 1
  monkeypatch.setattr(demo.demo_config, "get_config", lambda stage: edited)
  assert not demo.cached(str(tmp_path / "A"), list(demo.SMOKE))
  # The density task's fields are D's: A stays cached when they change.
  density_edit = get_config("pretrain")
  density_edit.density.scale += 1
  monkeypatch.setattr(demo.demo_config, "get_config", lambda stage: density_edit)
  assert demo.cached(str(tmp_path / "A"), list(demo.SMOKE))


def test_each_ablation_changes_one_existing_field_of_stage_d_or_of_another():
  from configs import density
  from countclip_jax import demo
  config = density.get_config("demo")
  bases = [overrides for _, _, overrides in demo.ABLATIONS.values()]
  for name, (_, backbone, overrides) in demo.ABLATIONS.items():
    if backbone != "B":
      assert (backbone, overrides) == ("A", []), name  # the backbone is the one change
      continue
    assert name.startswith("D_") and overrides
    assert len(overrides) == 1 or overrides[:-1] in bases, f"{name}: no ablation is its base"
    key, value = overrides[-1].removeprefix("--config.").split("=")
    assert all(not o.startswith(f"--config.{key}=") for o in overrides[:-1]), name
    node = config
    for part in key.split(".")[:-1]:
      node = node[part]
    assert key.split(".")[-1] in node, name
    assert str(node[key.split(".")[-1]]) != value, f"{name} changes nothing"


def test_the_report_tabulates_the_ablations(tmp_path):
  from countclip_jax import demo
  row = {"mae": 2.0, "rmse": 3.0, "mean_count": 20.0, "majority_mae": 1.5, "minority_mae": 2.5,
         "absent_mean": 0.25, "absent_mean_color_present": 0.75, "absent_mean_color_absent": 0.0}
  table = demo.density_table({"D": row, "D_clip_count_pooling": {**row, "minority_mae": None}},
                             {"D": 60}, lambda n: n)
  assert table[2] == "| D | 2.00 | 3.00 | 20.00 | 1.50 | 2.50 | 0.25 (0.75 / 0.00) | 60 s |"
  assert table[3] == ("| D_clip_count_pooling | 2.00 | 3.00 | 20.00 | 1.50 | - | "
                      "0.25 (0.75 / 0.00) | 0 s |")
