"""benchmarks/: accelerator.sh --smoke end to end on this CPU, its table, density_step.py's parsing."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_the_accelerator_script_runs_end_to_end_in_smoke_mode(tmp_path):
  out = tmp_path / "results"
  result = subprocess.run(["bash", "benchmarks/accelerator.sh", "--smoke", "--out", str(out),
                           "--repeats", "1", "--window_s", "0.05",
                           # The sweep's time budget, not the machine's speed, is under test:
                           # room for a 2-core CPU that the other test worker keeps busy.
                           "--limit_s", "900"], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=1000)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  ok = {(r["case"], r["per_device_batch"]) for r in results["cases"] if r["status"] == "ok"}
  assert ok == {("tiny", 4), ("tiny", 8), ("density_tiny", 4)}, results["cases"]
  for row in results["cases"]:
    assert row["step_s"] > 0 and row["compile_s"] > 0 and row["flops_per_step"] > 0, row
  assert results["environment"]["probe_peak"] > 0
  table = (out / "results.md").read_text()
  assert "| case | batch/device | step ms |" in table and "| density_tiny | 4 |" in table
  assert (out / "log.txt").exists()


def test_the_table_divides_by_the_right_peaks():
  import accelerator  # pylint: disable=g-import-not-at-top
  env = {"device_kind": "NVIDIA H200", "platform": "gpu", "devices": 2, "jax": "x", "utc": "t",
         "datasheet_bf16_peak": 1000e12, "probe_peak": 500e12, "cpu": "c", "cpus": 16}
  ok = {"case": "b32", "per_device_batch": 256, "status": "ok", "step_s": 0.1,
        "examples_per_s_per_device": 2630.0, "flops_per_step": 40e12, "flops_source": "counted",
        "compile_s": 12.0, "compiled_bytes": 2 ** 31, "peak_bytes_in_use": 2 ** 32}
  table = accelerator.markdown(env, [ok, {"case": "b32", "per_device_batch": 512,
                                          "status": "out of memory"}])
  # 40 TFLOP a step over 0.1 s on 2 devices: 200 TFLOP/s each, 20% of 1000 and 40% of 500.
  assert "| b32 | 256 | 100.0 | 2,630.0 | 20.0% | 40.0% | counted | 12.0 | 2.00 | 4.00 | 1.00x |" \
      in table, table
  assert "| b32 | 512 | out of memory |" in table
  assert accelerator.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while"))
  assert not accelerator.is_out_of_memory(ValueError("bad shape"))


def test_a_host_without_the_jax_stack_is_told_so(tmp_path):
  fake = tmp_path / "python"  # a Python on which every module but jax is found
  fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"import sys\n"
                  f"print(' '.join(n for n in sys.argv[1:] if n == 'jax'))\" \"$@\"\n")
  fake.chmod(0o755)
  result = subprocess.run(["bash", "benchmarks/accelerator.sh", "--smoke", "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(fake)}, timeout=60)
  assert result.returncode == 2 and "lacks jax:" in result.stderr, result.stderr


def test_density_step_reads_variants_and_names_ops_by_model_part():
  import density_step  # benchmarks/density_step.py
  assert density_step.parse_variant("") == {}
  assert density_step.parse_variant("heads=4+decoder_widths=[32,32,16,16]+pooling=eot") == {
      "heads": 4, "decoder_widths": (32, 32, 16, 16), "pooling": "eot"}
  hlo = ('  %fusion.3 = f32[2] fusion(%a), metadata={op_name="jit(<lambda>)/transpose(jvp('
         'DensityCounter))/interaction/block_1/self_attn/div" stack_frame_id=1}\n'
         '  %dot.7 = f32[2] dot(%b), metadata={op_name="jit(<lambda>)/jvp(DensityCounter)/'
         'decoder/stage_0/conv"}\n')
  assert density_step.op_parts(hlo) == {
      "fusion.3": ("bwd", ["DensityCounter", "interaction", "block_1", "self_attn", "div"]),
      "dot.7": ("fwd", ["DensityCounter", "decoder", "stage_0", "conv"])}


def test_input_pipeline_profile_names_where_a_row_goes(capsys):
  import input_pipeline  # pylint: disable=import-outside-toplevel
  assert input_pipeline.main(["--source", "records", "--num_images", "8", "--copies", "2",
                              "--batch_size", "8", "--image_size", "32", "--profile", "2"]) == 0
  out = capsys.readouterr().out
  assert "profile: 2 batches (16 examples)" in out and "tottime" in out


def test_train_step_op_profile_sums_the_traced_ops_by_kind(capsys, monkeypatch):
  import train_step  # pylint: disable=import-outside-toplevel
  # Other tests of this process may have started JAX's backend: no cluster to join here.
  monkeypatch.setattr(train_step.sharding, "initialize_distributed", lambda: None)
  assert train_step.main(["--arch", "tiny", "--batch_size", "16", "--repeats", "1", "--warmup",
                          "1", "--op_profile", "2", "--variants", "lam=0"]) == 0
  out = capsys.readouterr().out
  assert "XLA ops of lam=0" in out
  rows = out.split("XLA ops of")[1].splitlines()[1:]
  total = float(out.split("XLA ops of lam=0, ")[1].split(" ms")[0])
  shares = [float(r.split("ms")[1].split("%")[0]) for r in rows if " ops  " in r]
  assert rows and 0 < total and 0 < sum(shares) <= 100.5  # the top 15 of all the ops
