"""notebooks/kvexp_colab.ipynb runs headless on a CPU against experiment=smoke, so that it cannot rot.

The parameters cell is overridden by a cell injected after it (papermill's convention); the Colab-only cells
(install, TensorRT-LLM, the MLflow UI through Colab's port proxy) do nothing outside Colab (IN_COLAB).
"""
import json
from pathlib import Path

import pytest

from kvexp.tracking import Tracker, default_uri

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "kvexp_colab.ipynb"
# Two quants at two context lengths, with fewer documents and timed iterations than smoke's: ~2 min on 2 cores
CI_PARAMETERS = """EXPERIMENT = "smoke"
QUANTS = "fp16,int8kv"
CONTEXTS = "context.prompt_len=256,320"
EXTRA = ["eval.limit=2", "bench.warmup=0"]"""


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert [c for c in code if "parameters" in c["metadata"].get("tags", [])], "no cell tagged parameters"
    text = "".join("".join(c["source"]) for c in code)
    for needed in ("setup_colab.sh", "serve_kernel_port_as_window", "proxyPort", "context=short,long", "kvexp.ui"):
        assert needed in text, needed


@pytest.mark.slow
def test_notebook_runs_the_smoke_sweep_and_shows_the_table_and_plots(tmp_path, offline_env):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
    pytest.importorskip("ipykernel", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(CI_PARAMETERS, metadata={"tags": ["injected-parameters"]}))
    # the kernel inherits this process's environment: offline Hub, the session's cache, kvexp importable
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    jobs = Tracker(default_uri(tmp_path), "kvexp").jobs("attributes.status = 'FINISHED'")
    assert len(jobs) == 4, text[-3000:]
    table = [line for line in text.splitlines() if line.startswith("tiny ")]
    assert any(" int8kv " in line and " 320+32 " in line and "x)" in line for line in table), text[-3000:]
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) == 2  # quality vs memory, speed vs context
    assert "not on Colab" in text  # the UI cell's fallback: the Colab-only cells were skipped
    assert (tmp_path / "mlruns").is_dir() and (tmp_path / "outputs" / "compare" / "notebook" / "compare.html").is_file()
