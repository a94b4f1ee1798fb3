"""slm.cpu: the CPU's description and the measured bf16 probe that `--dtype auto` follows."""

from __future__ import annotations

import json
import os
import shutil

import torch

from conftest import slm_cli


def test_the_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    from slm import cpu

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu.bf16_speedup.cache_clear()
    timed = []
    real = cpu.seconds_per_matmul
    monkeypatch.setattr(cpu, "seconds_per_matmul", lambda a, seconds: timed.append(a.dtype) or real(a, seconds))
    first = cpu.bf16_speedup()
    assert first > 0 and timed == [torch.float32, torch.bfloat16] * cpu.PROBE_ROUNDS  # in turns
    saved = [json.loads(p.read_text()) for p in (tmp_path / "slm").glob("cpu-probe-*.json")]
    assert len(saved) == 1 and saved[0]["bf16_speedup"] == first and saved[0]["threads"] == torch.get_num_threads()
    cpu.bf16_speedup.cache_clear()
    assert cpu.bf16_speedup() == first and len(timed) == 2 * cpu.PROBE_ROUNDS  # read back, not measured again
    cpu.bf16_speedup.cache_clear()


def test_an_instruction_set_cap_is_probed_on_its_own(monkeypatch):
    """A run under ONEDNN_MAX_CPU_ISA=AVX2 (say) has other bf16 kernels: it must not read the uncapped answer."""
    from slm import cpu

    info = cpu.cpu_info()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    uncapped = cpu.probe_key(info)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu.probe_key(info) != uncapped
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert cpu.probe_key(info) == uncapped


def test_auto_follows_the_measurement_not_the_flags(monkeypatch):
    from slm import cpu, machine

    for speedup, expected in ((7.6, torch.bfloat16), (1.2, None), (0.01, None)):
        monkeypatch.setattr(cpu, "bf16_speedup", lambda s=speedup: s)
        monkeypatch.setattr(machine, "bf16_pays", cpu.bf16_pays)
        assert machine.autocast_dtype("auto", torch.device("cpu")) == expected
        assert machine.autocast_dtype("fp32", torch.device("cpu")) is None
        assert machine.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # asked for: given


def test_info_describes_the_machine():
    from slm.cpu import cpu_info

    r = slm_cli("info")
    assert r.returncode == 0, r.stderr
    info = cpu_info()
    assert f"CPU: {info.model} ({info.logical_cpus} logical CPUs" in r.stdout
    assert "bf16 matrix products:" in r.stdout and "train --dtype auto:" in r.stdout and "decoding:" in r.stdout
    assert "presets (parameters):" in r.stdout
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    assert (f"C++ compiler: {cxx})" if cxx else "none found, so eager on the CPU") in r.stdout
    bf16 = "train --dtype auto: bf16 autocast" in r.stdout
    assert ("compiled bf16 steps take slm's own attention backward" in r.stdout) == bool(bf16 and cxx)

