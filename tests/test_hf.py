"""Hugging Face: galorex groups on transformers' LlamaForCausalLM, and a galorex optimizer through
the Trainer's own training, checkpointing and resumption (the optional [hf] extra)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="install the [hf] extra (transformers, accelerate)")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate: install the [hf] extra")

import galorex

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))


def test_groups_follow_hugging_face_names():
    model = tiny_llama()
    names = galorex.select_galore_parameters(model)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all((".self_attn." in n or ".mlp." in n) and n.endswith("_proj.weight") for n in names)
    linear = galorex.select_galore_parameters(model, "all-linear")
    assert set(linear) == set(names)  # every nn.Linear but lm_head
    assert not any("embed_tokens" in n or "lm_head" in n or "norm" in n for n in linear)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _train(out, resume=None):
    model = tiny_llama()
    groups = galorex.galore_param_groups(model, rank=8, update_proj_gap=2, scale=0.25)
    opt = galorex.GaLoreAdamW(groups, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        save_steps=3,
        save_strategy="steps",
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, opt, losses


def test_trainer_trains_saves_and_resumes_bit_for_bit(tmp_path):
    straight, opt, losses = _train(tmp_path / "a")
    assert (tmp_path / "a" / "checkpoint-3").is_dir() and (tmp_path / "a" / "checkpoint-6").is_dir()
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert any("basis" in s for s in opt.state.values())  # the projected weights really were projected
    resumed, _, resumed_losses = _train(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    assert resumed_losses == losses
