"""A final/ (or checkpoint) whose replacement a killed run left half done is settled by the next train, saying so."""

import subprocess
import sys

from tests.conftest import invoke
from tests.training.test_train_data import write_shapes

FAST = ("--model", "embedded", "--teacher_steps", "2", "--student_steps", "2", "--grad_accum", "1", "--seed", "3",
        "--checkpointing_steps", "2", "--max_steps", "2")


def _train(shapes, output, *extra):
    return invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", output, "--run_name", "run",
                  *FAST, *extra)


def test_a_final_folder_left_aside_by_a_killed_replacement_is_put_back(tmp_path, embedded_model):
    shapes = write_shapes(tmp_path / "data", count=2)
    output = tmp_path / "out"
    assert _train(shapes, output).exit_code == 0
    lora = output / "run" / "lora"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # kill -9 between the two renames of a final/ replacement: the old version aside, a half-filled new one.
    (lora / "final").rename(lora / f".final.old-{dead.pid}-0123abcd")
    (lora / f".final.tmp-{dead.pid}-0123abcd").mkdir()
    (lora / f".checkpoint-4.tmp-{dead.pid}-4567abcd").mkdir()
    result = _train(shapes, output, "--resume_from_checkpoint", "latest")
    assert result.exit_code == 0, result.output
    assert f"Restored '{lora / 'final'}'" in result.output
    assert f"Removed 1 hidden folder(s) (0.0 MB) that an interrupted run left beside '{lora / 'checkpoint-4'}'" in (
        result.output)
    assert sorted(path.name for path in lora.iterdir()) == ["checkpoint-2", "final"]
    assert (lora / "final" / "pytorch_lora_weights.safetensors").is_file()  # put back, then written again
