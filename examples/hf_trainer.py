"""Fine-tune SmolLM2-135M with HF's Trainer and a ZO method (forward passes only), offline.

    .venv/bin/python examples/hf_trainer.py [--steps 40] [--accumulation 2] [--out runs/hf-trainer]

The Trainer does what it always does (batching, gradient accumulation, lr schedule, logging,
evaluation, checkpoints); zotune.hf.ZOTrainer replaces backprop by two perturbed forwards per
micro-batch. Set report_to=["tensorboard"] or ["wandb"] when those are installed.
"""

import argparse

import torch
from transformers import DataCollatorForLanguageModeling, TrainingArguments

from zotune.hf import ZOTrainer
from zotune.models import ModelConfig, load_model
from zotune.tasks import TaskConfig, load_examples


class Reviews(torch.utils.data.Dataset):
    """'<review> It was great/terrible' as plain text: the Trainer's usual causal-LM data."""

    def __init__(self, tokenizer, examples):
        words = TaskConfig().verbalizer
        self.items = [tokenizer(f"{text} It was {words[label]}", truncation=True, max_length=96) for text, label in examples]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--out", default="runs/hf-trainer")
    args = parser.parse_args()

    model, tokenizer = load_model(ModelConfig())  # the offline default model
    for name, p in model.named_parameters():  # the last two blocks, as zotune's default job
        p.requires_grad_(name.startswith(("model.layers.28.", "model.layers.29.", "model.norm.")))
    examples = load_examples("rotten_tomatoes")
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=args.accumulation, learning_rate=1e-4, lr_scheduler_type="constant",
        logging_steps=5, eval_strategy="steps", eval_steps=args.steps // 2, save_steps=args.steps // 2,
        report_to=[], use_cpu=True, seed=0)
    trainer = ZOTrainer(model=model, args=training, train_dataset=Reviews(tokenizer, examples[:1000]),
                        eval_dataset=Reviews(tokenizer, examples[-100:]),
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                        zo_method="zosgd", zo_options={"eps": 1e-3})
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"eval loss {before:.4f} -> {after:.4f} after {args.steps} ZO steps")


if __name__ == "__main__":
    main()
