"""Installed, kvrec lives under one import namespace and shadows no one's `models` or `server`."""

import subprocess
import sys


def run_outside(tmp_path, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from a directory outside the checkout (no repo on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_every_part_imports_under_kvrec(tmp_path):
    proc = run_outside(tmp_path, "import kvrec.models.state, kvrec.compression.codec, kvrec.server.store, "
                                 "kvrec.loadtest.options, kvrec.cli; print(kvrec.cli.build_parser().prog)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "kvrec"


def test_no_top_level_package_named_after_a_folder(tmp_path):
    for name in ("models", "compression", "server", "loadtest"):
        proc = run_outside(tmp_path, f"import {name}")
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, name


def test_imports_point_one_way():
    """models <- compression <- server, and only kvrec.cli (the top) imports loadtest."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    forbidden = {"models": ("kvrec.compression", "kvrec.server", "kvrec.loadtest"),
                 "compression": ("kvrec.server", "kvrec.loadtest"), "server": ("kvrec.loadtest",)}
    offenders = [f"{p.relative_to(root)} imports {name}" for folder, names in forbidden.items()
                 for p in (root / folder).rglob("*.py") for name in names if name in p.read_text()]
    assert offenders == []


def test_the_cli_offers_every_registered_backbone():
    """`kvrec train --model` spells the registry's names out (so `--help` imports no torch): kept equal,
    and every backbone has its default learning rate."""
    from kvrec.models.cli import DEFAULT_LR, MODEL_KINDS
    from kvrec.models.registry import MODELS

    assert sorted(MODEL_KINDS) == sorted(MODELS) == sorted(DEFAULT_LR)
