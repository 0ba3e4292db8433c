"""A valid policy with every layer kind, shared by the policy tests (tests/ has no packages); and its version-1
counterpart for the migration tests."""

from __future__ import annotations

from sixbit_tune import policy as P


def make_policy(**tdc) -> P.Policy:
    layers = {
        "blocks.0.attn1.to_q": P.LayerPolicy(
            "nvfp4", 256, 256, mode="dynamic",
            predictor={"cond": (0.8, 0.01, 0.93, 96), "uncond": (0.5, 0.02, 0.9, 96)},
        ),
        "blocks.0.ffn.net.2": P.LayerPolicy("int8", 512, 256),
        "blocks.1.attn1.to_q": P.LayerPolicy("nvfp4", 256, 256, encoder="scale-search"),
        "blocks.1.attn1.to_k": P.LayerPolicy("nvfp4", 256, 256, "fp8", "int8", "robust"),
        "blocks.1.attn1.to_v": P.LayerPolicy("fp8", 256, 256),
        "blocks.1.ffn.net.0.proj": P.LayerPolicy("none", 256, 520),
    }
    attention = P.Attention(0.05, "int8", {
        "0": P.AttentionBlock("dynamic", {"pooled": (0.3, 0.01, 0.8, 96)}),
        "1": P.AttentionBlock("8bit"),
    })
    return P.Policy(
        model=P.ModelInfo("WanTransformer3DModel", "wan", "ab" * 32, 8, spec="reference"),
        target=P.Target("NVIDIA H200", "9.0", {
            "nvfp4/nvfp4": P.MenuEntry("triton-nvfp4-emulated", tflops=512.0, speedup=0.66),
            "fp8/fp8": P.MenuEntry("scaled-mm-fp8", tflops=1166.0, speedup=1.5),
        }),
        dmpq=P.DMPQ(0.12, layers),
        attention=attention,
        tdc=P.TDC(**({"tolerance": 0.05, "blocks": [0, 3, 7]} | tdc)),
        measured=P.Measured(latency_ms=812.5, speedup=1.4, weight_bytes=123456, psnr_db=31.2, nvfp4_share=0.6),
        provenance=P.Provenance(study="s1", trial=17, profile_runs=["r1", "r2"]),
    )


def make_v1_dict() -> dict:
    """A version-1 policy dict with every version-1 layer mode (as version 1 wrote it)."""
    return {
        "schema_version": 1,
        "model": {"class": "WanTransformer3DModel", "family": "wan", "config_hash": "ab" * 32, "blocks": 8,
                  "spec": "reference"},
        "target": {"gpu": "NVIDIA H200", "compute_capability": "9.0", "nvfp4_path": "emulated"},
        "dmpq": {
            "threshold": 0.12, "first_step_format": "nvfp4", "nvfp4_weight_encoder": "scale-search",
            "layers": {
                "blocks.0.attn1.to_q": {"mode": "dynamic", "in_features": 256, "out_features": 256, "alpha": 0.8,
                                        "beta": 0.01, "r2": 0.93, "n": 96},
                "blocks.0.ffn.net.2": {"mode": "int8", "in_features": 512, "out_features": 256, "alpha": None,
                                       "beta": None, "r2": None, "n": None},
                "blocks.1.attn1.to_q": {"mode": "nvfp4", "in_features": 256, "out_features": 256},
                "blocks.1.ffn.net.0.proj": {"mode": "none", "in_features": 256, "out_features": 520},
            },
        },
        "tdc": {"tolerance": 0.05, "warmup": 3, "cooldown": 2, "max_skips": 2, "cache_dtype": "bfloat16",
                "blocks": [0, 3, 7]},
        "measured": {"latency_ms": 812.5},
        "provenance": {"study": "s1", "trial": 17, "profile_runs": ["r1"], "created": "2026-12-01T00:00:00+00:00",
                       "tool_version": "0.1.0"},
    }
