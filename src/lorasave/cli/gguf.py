"""``lorasave gguf``, ``gguf-adapter`` and ``install-llama-cpp``: the llama.cpp side of the CLI.

Registered on :data:`lorasave.cli.main.main` when ``lorasave.cli.main`` is imported; same thin-shell rules.
"""

from __future__ import annotations

import click

from lorasave.cli.app import (
    _debug_option,
    _deferred,
    _output_option,
    _run,
    _save_options,
    _SaveOptions,
    _sources_argument,
    _threads_option,
    _tokenizer_option,
    _with_sources,
    main,
)

#: ``lorasave.formats.gguf.quant.GgufType`` values, listed here so that ``--help`` does not import gguf
#: (tests/test_gguf_types.py checks they agree).
_GGUF_STREAMED = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
GGUF_TYPE_CHOICES = (
    *_GGUF_STREAMED,
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "iq4_nl",
    "iq4_xs",
    "iq3_s",
    "iq3_m",
    "q2_k_s",
    "iq3_xxs",
    "iq3_xs",
    "iq2_xxs",
    "iq2_xs",
    "iq2_s",
    "iq2_m",
    "iq1_s",
    "iq1_m",
    "tq1_0",
    "tq2_0",
    "mxfp4_moe",
    "q1_0",
)
#: ``lorasave.formats.gguf.quant.ALIASES``: llama-quantize's other names for a type.
GGUF_TYPE_ALIASES = ("q3_k", "q4_k", "q5_k")
#: Types that need ``--imatrix`` (``GgufType.needs_imatrix``).
GGUF_IMATRIX_TYPES = ("q2_k_s", "iq3_xxs", "iq3_xs", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq1_s", "iq1_m")
#: ``lorasave.formats.gguf.quant.OVERRIDE_TYPES`` names, lower case (``--output-tensor-type``,
#: ``--token-embedding-type``; tests/test_gguf_types.py checks they agree).
GGML_OVERRIDE_CHOICES = (
    *("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "iq3_s"),
    *("iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m", "tq1_0", "tq2_0", "mxfp4", "q1_0"),
)


#: ``--name`` of the GGUF commands.
_name_option = click.option(
    "--name", default=None, help="general.name and file stem, NAME-<TYPE>.gguf (default: llama.cpp's converter's names, from the model)."
)


class GgufTypeList(click.ParamType):
    """One GGUF type or a comma-separated list of them (``q8_0,q4_k_m,f16``), each one of ``GGUF_TYPE_CHOICES``."""

    name = "TYPE[,TYPE...]"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        parts = [p.strip().lower() for p in str(value).split(",")]
        bad = [p for p in parts if p not in GGUF_TYPE_CHOICES and p not in GGUF_TYPE_ALIASES]
        if bad or not parts:
            self.fail(
                f"{', '.join(repr(b) for b in bad) or 'nothing'} is not a GGUF type; choose from {', '.join(GGUF_TYPE_CHOICES)} (or several, comma-separated)",
                param,
                ctx,
            )
        return ",".join(parts)


@main.command("gguf", short_help="Merge adapter(s) into a base; write GGUF file(s) (f16, q8_0, q4_k_m...) from one read.")
@_sources_argument(adapter_required=False)
@_output_option
@click.option(
    "--type",
    "gguf_type",
    type=GgufTypeList(),
    default="f16",
    show_default=True,
    help=(
        "GGML type of the weights, or several comma-separated (q8_0,q4_k_m,f16: one file each, from one read and one merge); "
        f"one of {', '.join(GGUF_TYPE_CHOICES)} (q3_k, q4_k, q5_k: the _m ones). Past q5_1: encoded in the pass by llama.cpp's own quantizer "
        f"(needs the runtime); {', '.join(GGUF_IMATRIX_TYPES)} need --imatrix."
    ),
)
@click.option(
    "--imatrix",
    type=click.Path(dir_okay=True),
    default=None,
    help="llama-quantize's --imatrix: an importance matrix (llama-imatrix's imatrix.gguf or legacy .dat, or a `lorasave imatrix` output) for q4_0 ... iq1_m.",
)
@click.option("--pure", is_flag=True, help="llama-quantize's --pure: every quantized tensor the type's default GGML type, no per-tensor mix (q4_0 ... q6_k).")
@click.option(
    "--output-tensor-type",
    type=click.Choice(GGML_OVERRIDE_CHOICES, case_sensitive=False),
    default=None,
    help="llama-quantize's --output-tensor-type: GGML type of output.weight (q4_0 ... q6_k files; needs the llama.cpp runtime).",
)
@click.option(
    "--token-embedding-type",
    type=click.Choice(GGML_OVERRIDE_CHOICES, case_sensitive=False),
    default=None,
    help="llama-quantize's --token-embedding-type: GGML type of token_embd.weight (q4_0 ... q6_k files; needs the llama.cpp runtime).",
)
@_threads_option
@click.option("--no-modelfile", is_flag=True, help="Do not write an Ollama Modelfile (written when the model has a chat template).")
@_name_option
@click.option("--verify", "verify_output", is_flag=True, help="Probe the GGUF tensors against the sources before it is renamed into place.")
@click.option(
    "--report",
    is_flag=True,
    help="Run each file in llama.cpp on a text: size, bits/weight, perplexity, KL divergence, top-1 vs the f32 merge and the PeftModel; "
    "table in README.md and printed, chart quality.png (needs the runtime; the chart needs lorasave[report]).",
)
@click.option("--report-text", default=None, metavar="FILE", help="The --report text (UTF-8; default: a built-in text of ~450 tokens).")
@_tokenizer_option("Take")
@_save_options
@click.pass_context
def gguf_cmd(
    ctx: click.Context,
    sources: tuple[str, ...],
    output: str,
    gguf_type: str,
    imatrix: str | None,
    pure: bool,
    output_tensor_type: str | None,
    token_embedding_type: str | None,
    no_modelfile: bool,
    name: str | None,
    verify_output: bool,
    report: bool,
    report_text: str | None,
    tokenizer: str | None,
    opts: _SaveOptions,
) -> None:
    """Merge ADAPTER(s) into BASE and write OUT/<Name>-<size>-<TYPE>.gguf for llama.cpp (one per --type), streaming.

    Files are named as llama.cpp's converter names them (general.name, basename, finetune, size_label from
    BASE's card, config and folder name; --name NAME: NAME-<TYPE>.gguf). With no ADAPTER, BASE is converted
    as it is; with no BASE, the adapters' adapter_config.json names it. Llama (incl. Llama 3.1 RoPE), Mistral, Qwen2,
    Qwen3, Gemma 3 (text) and Phi-3; BPE, SentencePiece and tokenizer.json tokenizers. OUT also
    gets README.md and, when the model has a chat template, an Ollama Modelfile.
    """
    options = {"type": gguf_type, "name": name, "tokenizer": tokenizer, "verify": verify_output, "modelfile": not no_modelfile}
    if pure or output_tensor_type or token_embedding_type:
        options.update(pure=pure, output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type)
    if report or report_text:
        options.update(report=True, report_text=report_text)
    if imatrix is not None:
        options["imatrix"] = imatrix
    export = _with_sources(_deferred("lorasave.formats.gguf.export", "export_gguf"), sources, adapter_required=False)
    opts.save(ctx, export, output, progress=opts.progress, **options)


@main.command("gguf-adapter", short_help="Write a LoRA adapter as a GGUF adapter for llama.cpp --lora.")
@_sources_argument(adapter_required=True)
@_output_option
@click.option("--type", "gguf_type", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True, help="GGML type of lora_a/lora_b.")
@_name_option
@_save_options
@click.pass_context
def gguf_adapter_cmd(ctx: click.Context, sources: tuple[str, ...], output: str, gguf_type: str, name: str | None, opts: _SaveOptions) -> None:
    """Write ADAPTER (trained on BASE) as OUT/<Name>-<TYPE>-LoRA.gguf, loaded by llama.cpp with --lora on BASE's GGUF.

    Named as convert_lora_to_gguf.py names it, from the adapter folder (--name NAME: NAME-<TYPE>-LoRA.gguf).
    Without BASE, the base is the one adapter_config.json names.

    PEFT's scaling (rsLoRA, rank/alpha patterns) is kept exactly. DoRA, modules_to_save, new tokens and
    non-LoRA tuners are refused: use `lorasave gguf BASE ADAPTER` for a merged GGUF.
    """
    export = _with_sources(_deferred("lorasave.formats.gguf.adapter", "export_gguf_adapter"), sources)
    opts.save(ctx, export, output, type=gguf_type, name=name)


@main.command("install-llama-cpp", short_help="Install the optional llama.cpp runtime (k-quants, checks in llama.cpp) or its converter.")
@click.option("--dir", "target", default=None, help="Target folder (default: $LORASAVE_LLAMA_CPP_DIR, else <lorasave cache>/llama-cpp/<version>).")
@click.option("--force", is_flag=True, help="Reinstall even when already installed.")
@click.option("--from-tgz", default=None, metavar="PATH", help="Install from a downloaded package tarball (integrity-checked), offline.")
@click.option(
    "--converter",
    is_flag=True,
    help="Also install llama.cpp's own converter (convert_hf_to_gguf.py of the same version) in its own Python environment "
    "(torch, transformers; several GB, once): `lorasave gguf` uses it for architectures it does not write itself.",
)
@click.option(
    "--converter-dir",
    default=None,
    metavar="D",
    help="The converter's folder (default: $LORASAVE_LLAMA_CPP_CONVERTER_DIR, else <lorasave cache>/llama-cpp/<version>-converter).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@_debug_option
@click.pass_context
def install_llama_cpp_cmd(
    ctx: click.Context, target: str | None, force: bool, from_tgz: str | None, converter: bool, converter_dir: str | None, as_json: bool
) -> None:
    """Download and install llama.cpp's prebuilt libraries (same as `lorasave install-llama-cpp`); with --converter, also
    llama.cpp's converter and its Python environment."""
    from lorasave.runtimes.llama_cpp.install import install

    if not converter:
        _run(ctx, lambda: install(target, force=force, from_tgz=from_tgz), quiet=False, as_json=as_json)
        return
    from lorasave.runtimes.llama_cpp.converter import install_converter

    def both() -> object:
        install(target, force=force, from_tgz=from_tgz)
        return install_converter(converter_dir, force=force)

    _run(ctx, both, quiet=False, as_json=as_json)


@main.command("compare", short_help="Measure GGUF files in llama.cpp: size, bits/weight, perplexity, KL divergence, top-1.")
@click.argument("paths", nargs=-1, required=True, metavar="OUT_OR_FILE...")
@click.option("--text", "text_file", default=None, metavar="FILE", help="The text to run (UTF-8; default: a built-in text of ~450 tokens).")
@click.option("--chart", default=None, metavar="PNG", help="Also draw file size against KL divergence into this PNG (needs lorasave[report]).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")
@_debug_option
@click.pass_context
def compare_cmd(ctx: click.Context, paths: tuple[str, ...], text_file: str | None, chart: str | None, as_json: bool) -> None:
    """Run GGUF files (or the files of `lorasave gguf` OUT folders) in llama.cpp on a text and print, per type:
    size, bits per weight, perplexity, KL divergence and top-1 agreement.

    An OUT folder's lorasave.json names its base and adapters: the files are then measured against the
    float32 merge and the unmerged PeftModel. Otherwise against the highest-precision file given.
    """
    compare = _deferred("lorasave.verify.quality_report", "compare")
    _run(ctx, lambda: compare(list(paths), text_file=text_file, chart=chart), quiet=False, as_json=as_json)
