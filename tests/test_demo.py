"""demo.py: the three chained stages, the report and the export, at a few steps."""
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
  assert set(report) == {"A", "B", "C"}
  for stage in report.values():
    assert set(stage) == {"count_accuracy", "count_mae", "color_accuracy", "shape_accuracy"}
    assert all(0 <= v <= 1 for k, v in stage.items() if k != "count_mae")
  text = (tmp_path / "report.md").read_text()
  assert "| B: fine-tuned with the counting loss |" in text and "curves.png" in text
  assert (tmp_path / "curves.png").exists()
  assert (tmp_path / "B" / "hf" / "model.safetensors").exists()
  # B and C start from A's Hugging Face export: the worked example of chaining runs.
  assert f"--config.model.init={tmp_path}/A/hf" in first.stdout
  # A second demo with the same arguments would reuse the cached stage A; other ones retrain it.
  from countclip_jax import demo
  assert demo.cached(str(tmp_path / "A"), list(demo.SMOKE))
  assert not demo.cached(str(tmp_path / "A"), [])
  # ... and so does an edited preset.
  edited = demo.demo_config.get_config("pretrain")
  edited.train.steps += 1
  monkeypatch.setattr(demo.demo_config, "get_config", lambda stage: edited)
  assert not demo.cached(str(tmp_path / "A"), list(demo.SMOKE))
