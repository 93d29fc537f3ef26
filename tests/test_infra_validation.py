"""Infra-validation: the candidate as TF Serving loads it (TF1 Session) and in `mtrec serve`."""

import os
import shutil

import pytest

from components import features as F
from components.artifacts.saved_model import read_warmup_requests
from components.errors import GateError
from components.infra_validation.validator import (
    infra_validate,
    run_as_tf_serving,
    run_infra_validation,
)


def test_tf1_session_runs_every_signature_by_tensor_name(small_saved_model):
    requests = list(read_warmup_requests(small_saved_model))
    outputs = run_as_tf_serving(small_saved_model, requests)
    by_signature = {r.model_spec.signature_name: o for r, o in zip(requests, outputs, strict=True)}
    assert by_signature[F.SIGNATURE_RETRIEVE][F.OUT_MOVIE_IDS].shape == (4, 10)
    assert by_signature[F.SIGNATURE_RANK][F.OUT_STARS].shape == (4,)


@pytest.mark.slow
def test_a_good_candidate_passes_in_both(tmp_path, small_saved_model):
    result = run_infra_validation(small_saved_model, str(tmp_path / "infra"))
    assert result["blessed"] and result["requests"] == 4
    assert os.path.isfile(tmp_path / "infra" / F.INFRA_BLESSING_FILE)


def test_a_broken_candidate_fails_and_writes_no_blessing(tmp_path, small_saved_model):
    broken = str(tmp_path / "broken")
    shutil.copytree(small_saved_model, broken)
    shutil.rmtree(os.path.join(broken, "variables"))
    with pytest.raises(GateError, match="fails as TF Serving loads it"):
        run_infra_validation(broken, str(tmp_path / "infra"))
    assert not (tmp_path / "infra").exists()


def test_a_candidate_without_warmup_requests_fails(tmp_path, small_saved_model):
    bare = str(tmp_path / "bare")
    shutil.copytree(small_saved_model, bare)
    os.remove(os.path.join(bare, "assets.extra", "tf_serving_warmup_requests"))
    with pytest.raises(GateError, match="no warmup requests"):
        infra_validate(bare)
