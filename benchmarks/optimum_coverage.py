"""attnfuse on files that another tool wrote: Hugging Face Optimum's exports of tiny random-weight
models of many architectures (encoders, vision, seq2seq with and without a cache, decoders with a
KV cache), optimized the way a user does it, through the command line.

Two steps, because Optimum pins transformers below what attnfuse's own tests use:

    # 1. in a venv of its own: pip install torch==2.13.0 && pip install optimum-onnx
    /path/to/optimum-venv/bin/python benchmarks/optimum_coverage.py export OUT_DIR
    # 2. here
    python -m benchmarks.optimum_coverage measure OUT_DIR [--json PATH]

Step 1 builds each model from its transformers config (hidden 64, 2 layers, random weights,
nothing downloaded), saves it to OUT_DIR/models/NAME and runs `optimum-cli export onnx` into
OUT_DIR/onnx/NAME. Step 2 runs `attnfuse optimize FILE -o ... --report ...` on every .onnx file
and prints: exit code, attention sites fused / found, padding-free, and the first reason.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128,
              max_position_embeddings=64)
_DECODER = dict(_SMALL, num_key_value_heads=2)
_VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=128)
_SEQ2SEQ = dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
# name: (config class, config, model class, Optimum task)
MODELS = {
    "bert": ("BertConfig", _SMALL, "BertModel", "feature-extraction"),
    "bert-cls": ("BertConfig", _SMALL, "BertForSequenceClassification", "text-classification"),
    "roberta": ("RobertaConfig", dict(_SMALL, max_position_embeddings=66), "RobertaModel", "feature-extraction"),
    "xlm-roberta": ("XLMRobertaConfig", dict(_SMALL, max_position_embeddings=66), "XLMRobertaModel",
                    "feature-extraction"),
    "distilbert": ("DistilBertConfig", dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                            max_position_embeddings=64), "DistilBertModel", "feature-extraction"),
    "albert": ("AlbertConfig", dict(_SMALL, embedding_size=32), "AlbertModel", "feature-extraction"),
    "electra": ("ElectraConfig", dict(_SMALL, embedding_size=64), "ElectraModel", "feature-extraction"),
    "mpnet": ("MPNetConfig", dict(_SMALL, max_position_embeddings=66), "MPNetModel", "feature-extraction"),
    "deberta-v2": ("DebertaV2Config", _SMALL, "DebertaV2Model", "feature-extraction"),
    "vit": ("ViTConfig", _VISION, "ViTModel", "feature-extraction"),
    "deit": ("DeiTConfig", _VISION, "DeiTModel", "feature-extraction"),
    "clip": ("CLIPConfig", dict(text_config=dict(_SMALL, max_position_embeddings=64), vision_config=_VISION,
                                projection_dim=32), "CLIPModel", "feature-extraction"),
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64), "GPT2LMHeadModel",
             "text-generation-with-past"),
    "gpt2-nocache": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64),
                     "GPT2LMHeadModel", "text-generation"),
    "llama": ("LlamaConfig", _DECODER, "LlamaForCausalLM", "text-generation-with-past"),
    "llama-nocache": ("LlamaConfig", _DECODER, "LlamaForCausalLM", "text-generation"),
    "mistral": ("MistralConfig", dict(_DECODER, sliding_window=8), "MistralForCausalLM", "text-generation-with-past"),
    "qwen2": ("Qwen2Config", _DECODER, "Qwen2ForCausalLM", "text-generation-with-past"),
    "phi3": ("Phi3Config", dict(_DECODER, pad_token_id=0), "Phi3ForCausalLM", "text-generation-with-past"),
    "gemma": ("GemmaConfig", dict(_DECODER, num_key_value_heads=1, head_dim=16), "GemmaForCausalLM",
              "text-generation-with-past"),
    "opt": ("OPTConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                              max_position_embeddings=64, word_embed_proj_dim=64), "OPTForCausalLM",
            "text-generation-with-past"),
    "bloom": ("BloomConfig", dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4), "BloomForCausalLM",
              "text-generation-with-past"),
    "t5": ("T5Config", dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                            decoder_start_token_id=0), "T5ForConditionalGeneration", "text2text-generation-with-past"),
    "bart": ("BartConfig", dict(_SEQ2SEQ, max_position_embeddings=64), "BartForConditionalGeneration",
             "text2text-generation-with-past"),
    "whisper": ("WhisperConfig", dict(_SEQ2SEQ, num_mel_bins=16, max_source_positions=1500, max_target_positions=64,
                                      decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                "WhisperForConditionalGeneration", "automatic-speech-recognition-with-past"),
}


def export(out: pathlib.Path, names: list[str]) -> None:
    """Runs in Optimum's venv: save each tiny model and export it with optimum-cli."""
    import torch
    import transformers

    cli = pathlib.Path(sys.executable).with_name("optimum-cli")
    for name in names:
        config_class, config, model_class, task = MODELS[name]
        target = out / "onnx" / name
        if any(target.glob("*.onnx")):
            continue
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
        with torch.no_grad():  # biases and norm weights off their initial 0 and 1, so that each one counts
            for parameter in model.parameters():
                if parameter.ndim == 1:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
        model.save_pretrained(out / "models" / name)
        done = subprocess.run([str(cli), "export", "onnx", "--model", str(out / "models" / name), "--task", task,
                               str(target)], capture_output=True, text=True)
        print(f"{name}: {task}: exit {done.returncode}", flush=True)


def measure(out: pathlib.Path) -> list[dict]:
    """`attnfuse optimize` on every exported file, through the command line."""
    rows = []
    work = out / "attnfuse"
    work.mkdir(exist_ok=True)
    for file in sorted((out / "onnx").rglob("*.onnx")):
        name = f"{file.parent.name}/{file.name}"
        stem = name.replace("/", "__")
        report_path = work / f"{stem}.json"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "attnfuse.tools.cli", "optimize", str(file), "-o",
                               str(work / stem), "--report", str(report_path)], capture_output=True, text=True)
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        attention = report.get("attention", {})
        fusions = {f["name"]: f for f in report.get("fusions", [])}
        padding_free = fusions.get("padding-free", {})
        rows.append({
            "file": name, "exit": done.returncode, "seconds": round(time.perf_counter() - start, 1),
            "fused": attention.get("fused"), "total": attention.get("total"),
            "padding_free": padding_free.get("fused"), "padding_free_reason": padding_free.get("reason"),
            "reason": next((s["reason"] for s in attention.get("sites", []) if not s["fused"]), None)
            or (report.get("error") if done.returncode else None),
        })
        row = rows[-1]
        print(f"{name:44s} exit {row['exit']}  attention {row['fused']}/{row['total']}  "
              f"padding-free {'yes' if row['padding_free'] else 'no'}  {row['reason'] or ''}", flush=True)
    whole = sum(r["exit"] == 0 and r["total"] and r["fused"] == r["total"] for r in rows)
    print(f"{len(rows)} files: {whole} with every attention site fused, "
          f"{sum(r['exit'] != 0 for r in rows)} refused; sites {sum(r['fused'] or 0 for r in rows)}"
          f"/{sum(r['total'] or 0 for r in rows)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("export", "measure"))
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    if args.step == "export":
        export(args.out, args.models)
        return 0
    rows = measure(args.out)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
