"""Small files in the released formats, for the download tests: LAVIS's ``blip2_pretrained.pth`` (trainable
keys only) + bare-named ``eva_vit_g.pth`` (one block more than used, fp16), BLIP's ``{"model": ...}`` VQA
checkpoint, and a plain bert-base-uncased tokenizer folder. Widths keep the originals' head sizes (88 per
EVA head, 64 per BERT / ViT-B head), so the converters infer the architecture as for the real files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models.tiny import _bert_vocab
from tests.pipeline.models.model_servers import git_blob_sha1
from tests.pipeline.models.test_convert_blip2 import _randomised, _released_pair, _to_lavis
from tests.pipeline.models.test_convert_blip_vqa import to_original

# The converted folders' architecture (data/models.yaml's `expect`, at these sizes).
BLIP2_EXPECT = {"vision_config.hidden_size": 88, "vision_config.num_hidden_layers": 2,
                "vision_config.image_size": 28, "qformer_config.hidden_size": 64, "num_query_tokens": 4}
VQA_EXPECT = {"vision_config.hidden_size": 64, "vision_config.image_size": 32, "text_config.hidden_size": 64}


@dataclass
class Released:
    files: dict[str, bytes]  # Salesforce file name -> bytes
    bert: Path  # tokenizer folder, served as the hub's bert-base-uncased
    referee_itm_weight: torch.Tensor  # to recognise the converted referee


def build_bert(folder: Path) -> Path:
    from transformers import BertTokenizer

    folder.mkdir(parents=True)
    (folder / "raw-vocab.txt").write_text("\n".join(_bert_vocab()) + "\n")
    BertTokenizer(vocab=str(folder / "raw-vocab.txt")).save_pretrained(folder)
    (folder / "raw-vocab.txt").unlink()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))  # AutoTokenizer reads it
    return folder


def _blip2(vocab: int) -> tuple[dict[str, bytes], torch.Tensor]:
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    from pipeline.models.caption_head import Blip2CaptionHead, Blip2CaptionHeadConfig

    cfg = Blip2Config(
        vision_config=dict(hidden_size=88, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                           image_size=28, patch_size=14, qkv_bias=True),
        qformer_config=dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                            intermediate_size=80, encoder_hidden_size=88, cross_attention_frequency=1,
                            max_position_embeddings=40, use_qformer_text_input=True),
        num_query_tokens=4, image_text_hidden_size=16,
    )
    referee = _randomised(Blip2ForImageTextRetrieval(cfg).state_dict(), 0)
    head = _randomised(Blip2CaptionHead(Blip2CaptionHeadConfig(hidden_size=64, vocab_size=vocab)).state_dict(), 1)
    trainable, vit = _released_pair(_to_lavis(referee, head))
    return {"blip2_pretrained.pth": _torch_bytes({"model": trainable}), "eva_vit_g.pth": _torch_bytes(vit)}, \
        referee["itm_head.weight"]


def _vqa(tok) -> bytes:
    from transformers import BlipConfig, BlipForQuestionAnswering

    cfg = BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=1,
                           image_size=32, patch_size=16),
        text_config=dict(vocab_size=len(tok) + 2, hidden_size=64, encoder_hidden_size=64, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=40,
                         bos_token_id=len(tok), pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id),
    )
    torch.manual_seed(0)
    return _torch_bytes({"model": to_original(BlipForQuestionAnswering(cfg).state_dict())})


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def build_released(work: Path) -> Released:
    from transformers import AutoTokenizer

    bert = build_bert(work / "bert-base-uncased")
    tok = AutoTokenizer.from_pretrained(bert)
    files, itm = _blip2(len(tok) + 1)  # LAVIS adds [DEC]
    files["model_base_vqa_capfilt_large.pth"] = _vqa(tok)  # BLIP adds [DEC] and [ENC]
    return Released(files, bert, itm)


def file_entry(data: bytes, lfs: bool = True) -> dict:
    """A manifest entry for ``data``: sha256 as for LFS / plain files, else the git blob id."""
    digest = {"sha256": hashlib.sha256(data).hexdigest()} if lfs else {"git_sha1": git_blob_sha1(data)}
    return {"size": len(data), **digest}
