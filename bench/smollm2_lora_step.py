"""LoRA SFT training steps of SmolLM2-135M on IMDB reviews cast as SFT, without Spark: tokens/s and peak
memory with gradient checkpointing off and on, side by side (one process, this machine's threads).

    PYTHONPATH=. python bench/smollm2_lora_step.py [model folder] [steps]

The model folder is the dequantised SmolLM2 that `finetune` caches under outputs/.models/.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import pandas as pd
import torch

from spark_tuning.model.build import peak_rss_mb  # the figure training runs report


def main() -> None:
    from spark_tuning.model import lora
    from spark_tuning.config import LoraSettings, load_config
    from spark_tuning.text.lm_data import encode_chat
    from spark_tuning.loader.staging import IGNORE_INDEX
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sys.argv[1] if len(sys.argv) > 1 else sorted(glob.glob("outputs/.models/SmolLM2-*"))[0]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    cfg = load_config("conf/smollm2_lora_sft.yaml")
    tok = AutoTokenizer.from_pretrained(folder)
    reviews = pd.read_parquet("../shared/data/imdb/train.parquet").sample(64, random_state=0)
    rows = [encode_chat(tok, [{"role": "user", "content": cfg.data.sft_prompt.replace("{text}", t)},
                              {"role": "assistant", "content": ["negative", "positive"][l]}], True, cfg.data.max_length)
            for t, l in zip(reviews.text, reviews.label)]
    bs = cfg.train.batch_size
    load = os.getloadavg()[0]
    print(f"threads {torch.get_num_threads()}, load average {load:.1f}, batch {bs}, max_length {cfg.data.max_length}")
    results = {}
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = lora.apply(model, LoraSettings(enabled=True, r=8, alpha=16, dropout=0.05), "CAUSAL_LM")
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
        model.train()
        tokens, seconds, losses = 0, 0.0, []
        for step in range(steps + 1):  # step 0 warms up and is not timed
            batch = rows[step * bs:(step + 1) * bs]
            width = max(len(i) for i, _ in batch)
            ids = torch.full((bs, width), tok.pad_token_id)
            labels = torch.full((bs, width), IGNORE_INDEX)
            mask = torch.zeros((bs, width), dtype=torch.long)
            for r, (i, l) in enumerate(batch):
                ids[r, :len(i)], labels[r, :len(l)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(l), 1
            t = time.perf_counter()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step:
                seconds += time.perf_counter() - t
                tokens += int(mask.sum())
                losses.append(float(loss))
        results[checkpointing] = tokens / seconds
        print(f"gradient_checkpointing={checkpointing}: {tokens / seconds:.0f} tok/s over {steps} steps, "
              f"peak RSS so far {peak_rss_mb():.0f} MiB, trainable {trainable:,} of {total:,} "
              f"({100 * trainable / total:.2f}%), losses {[round(x, 3) for x in losses]}")
        del model, opt
    print(f"speed ratio checkpointing on/off: {results[True] / results[False]:.2f}")


if __name__ == "__main__":
    main()
