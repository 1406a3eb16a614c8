"""The field cases that pass and must keep passing, through the real CLI as their READMEs run them: a multi-frame
MPO read as its first frame, ragged images in batches of one, and a backbone a method is not defined for (listed
honestly by ``clipmaps models`` and refused before any work, exit 2)."""

from __future__ import annotations

import sys

import pytest

from tests.helpers.cases import BIN, CASES, make_case, needs_cases, run

pytestmark = needs_cases


@pytest.mark.slow  # 2 CLI runs, ~40 s; MPO frames and batch-of-one invariance also in tests/unit
@pytest.mark.parametrize("name", ["mpo-multi-frame", "ragged-batch-of-one"])
def test_case_passes_its_check(name, tmp_path):
    work = make_case(name, tmp_path)
    done = run(str(BIN / "clipmaps"), "run", "job.yaml", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    check = run(sys.executable, str(CASES / name / "check.py"), "out", cwd=work)
    assert check.returncode == 0 and "PASS" in check.stdout, check.stdout


def test_non_vit_backbone_is_listed_honestly_and_refused(tmp_path):
    work = make_case("non-vit-backbone-listed", tmp_path)
    # ConvNeXt: no method; CoCa and SigLIP (attention-pooling heads): LeGrad and MaskInversion, as upstream LeGrad
    for name, methods in (("convnext_tiny", "-"), ("coca_ViT-B-32", "legrad,maskinversion"), ("SigLIP", None)):
        listing = run(str(BIN / "clipmaps"), "models", "--no-tags", name, cwd=work)
        rows = [line.split() for line in listing.stdout.splitlines()[1:] if line and not line.startswith("families")]
        assert rows, listing.stdout
        for r in rows:  # SigLIP: every SigLIP-family row (a few *-SigLIP names are other towers in open_clip)
            expected = methods or ("legrad,maskinversion" if r[1] == "siglip" else "-")
            assert r[2] == expected, listing.stdout
    for extra in (["--dry-run"], []):
        done = run(str(BIN / "clipmaps"), "run", "job.yaml", *extra, cwd=work)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "methods.legrad: LeGrad cannot run on convnext_tiny" in done.stderr and "resume" not in done.stderr
