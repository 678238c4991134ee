"""Static layout inference on the real vLLM model classes (meta tree, no engine) matches the reviewed snapshots."""

import json

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp.layout import LAYOUTS_DIR, drift, load_snapshot  # noqa: E402
from nnterp.testing.architectures import RESULTS_FILE, SMOLLM2  # noqa: E402

RESULTS = json.loads((LAYOUTS_DIR / "vllm" / RESULTS_FILE).read_text())
PASSING = sorted(mt for mt, result in RESULTS.items() if result["status"] == "pass")
# vLLM's Transformers backend wraps every such model in one class, so only native classes have a snapshot each
NATIVE = [mt for mt in PASSING if RESULTS[mt].get("engine") == "native"]


def test_vllm_equivalence_recorded_for_several_architectures():
    assert len(PASSING) >= 5 and SMOLLM2 in PASSING


@pytest.mark.parametrize("model_type", NATIVE)
def test_vllm_layout_matches_reviewed_snapshot(model_type, tiny_path):
    from nnterp.standardized.vllm import StandardizedVLLM

    if model_type == SMOLLM2:
        from nnterp.testing.smollm2 import smollm2_path

        path = smollm2_path()
    else:
        path = tiny_path(model_type)
    with StandardizedVLLM(str(path), dispatch=False, dtype="float32", max_model_len=128, check_layout=False) as model:
        pass  # the layout is inferred at load; the engine is not needed after it
    reviewed = load_snapshot("vllm", model.layout.architecture)
    assert reviewed is not None, f"no reviewed vLLM layout for {model.layout.architecture}"
    assert drift(model.layout, reviewed) == []
    layer_layouts = [layout for key, layout in model.layout.modules.items() if key.startswith("layer:")]
    assert layer_layouts and all(layout.input.residual == "residual" or layout.output.kind != "dual" for layout in layer_layouts)
