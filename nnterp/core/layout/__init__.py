"""Module layouts: where the residual stream enters and leaves each module, inferred and snapshotted."""

from .infer import call_style_from_source, infer_module_layout, observe, signature_of
from .model import InputLayout, LayoutError, ModuleLayout, OutputLayout, check_same_shape
from .model_layout import ModelLayout, confirm_final_norm, infer_model_layout, module_key
from .snapshot import LAYOUTS_DIR, RESULTS_FILE, drift, load_snapshot, snapshot_path, write_snapshot

__all__ = [
    "InputLayout", "OutputLayout", "ModuleLayout", "ModelLayout", "LayoutError", "LAYOUTS_DIR", "RESULTS_FILE",
    "call_style_from_source", "confirm_final_norm", "check_same_shape", "drift", "infer_model_layout", "infer_module_layout",
    "load_snapshot", "module_key", "observe", "signature_of", "snapshot_path", "write_snapshot",
]
