"""GPU admission across processes, with real file locks, and the per-GPU default."""

import logging
import multiprocessing as mp
from pathlib import Path

import pytest
from transformers import Gemma2Config

from app.config import ConfigError, LoraSettings, ModelSettings, TrainSettings
from app.gpu_admission import GIB, check_fits, estimate_training_bytes, gpu_slot, resolve_checkpointing

pytestmark = pytest.mark.unit


def _hold(lock_dir: str, holding, release) -> None:
    with gpu_slot(Path(lock_dir), 1, "GPU-test"):
        holding.set()
        release.wait(30)


@pytest.fixture()
def other_client(tmp_path):
    """Another process training on the same GPU: it holds slot 0 until told to let go."""
    ctx = mp.get_context("spawn")
    holding, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(str(tmp_path), holding, release))
    other.start()
    assert holding.wait(60)
    yield other, release, ctx
    release.set()
    other.join(30)
    assert other.exitcode == 0


def test_a_free_second_slot_is_taken_at_once(tmp_path, other_client):
    other, _, _ = other_client
    with gpu_slot(tmp_path, 2, "GPU-test"):
        assert other.is_alive()  # both train at once


def test_a_full_gpu_makes_the_next_client_wait_and_say_so(tmp_path, other_client, caplog):
    other, release, ctx = other_client
    letting_go = ctx.Process(target=release.set)  # lets go only once we are waiting
    with caplog.at_level(logging.WARNING, logger="app.slots"):
        letting_go.start()
        with gpu_slot(tmp_path, 1, "GPU-test"):
            other.join(30)
            assert other.exitcode == 0  # we got the slot only after the holder left
    letting_go.join(30)
    assert "GPU GPU-test training slots: all 1 busy; waiting for gpu-GPU-test.slot0" in caplog.text
    assert "GPU GPU-test training slots: got gpu-GPU-test.slot0" in caplog.text


def test_slots_are_per_gpu(tmp_path):
    with gpu_slot(tmp_path, 1, "GPU-a"), gpu_slot(tmp_path, 1, "GPU-b"):
        pass  # would deadlock if the two GPUs shared a slot


LORA = LoraSettings(r=8, alpha=16, dropout=0.05, target_modules=("q_proj", "v_proj"))
TRAIN = TrainSettings(512, 2, 4, 1, 10, 5e-5, 1e-6, 5, 42, 0)


@pytest.fixture()
def gemma2_9b(tmp_path) -> str:
    """Gemma2-9B's shapes, as its config.json gives them."""
    Gemma2Config(
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
    ).save_pretrained(tmp_path)
    return str(tmp_path)


def test_estimate_matches_the_measured_gemma2_9b_peaks(gemma2_9b):
    on = estimate_training_bytes(ModelSettings(gemma2_9b, 4, True, LORA), TRAIN) / GIB
    off = estimate_training_bytes(ModelSettings(gemma2_9b, 4, False, LORA), TRAIN) / GIB
    assert 10.6 < on < 11.6 and 20.6 < off < 21.6  # measured per process: 11.08 and 21.08 GiB
    assert int(0.9 * 80 / on) == 6 and int(0.9 * 80 / off) == 3


@pytest.mark.parametrize(
    "sharing, gpu_gib, checkpointing",
    [(2, 80, False), (3, 80, False), (4, 80, True), (1, 24, False), (2, 24, True), (1, None, False)],
    ids=["2-on-80GB", "3-on-80GB", "4-on-80GB", "1-on-24GB", "2-on-24GB", "cpu"],
)
def test_auto_checkpointing_is_off_while_the_gpus_trainings_fit_without_it(gemma2_9b, sharing, gpu_gib, checkpointing):
    auto = ModelSettings(gemma2_9b, 4, None, LORA)
    gpu_bytes = None if gpu_gib is None else gpu_gib * GIB
    assert resolve_checkpointing(auto, TRAIN, sharing, gpu_bytes).gradient_checkpointing is checkpointing
    explicit = ModelSettings(gemma2_9b, 4, True, LORA)
    assert resolve_checkpointing(explicit, TRAIN, sharing, gpu_bytes) == explicit


def test_trainers_that_cannot_fit_are_refused_in_one_line(gemma2_9b):
    model = ModelSettings(gemma2_9b, 4, True, LORA)
    check_fits(model, TRAIN, 6, 80 * GIB)
    with pytest.raises(ConfigError) as err:
        check_fits(model, TRAIN, 3, 24 * GIB)
    assert str(err.value).startswith("--trainers-per-gpu 3: 3 trainers of about 11.") and "use at most 1 " in str(
        err.value
    )
