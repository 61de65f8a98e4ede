"""The model and its tokenizer, from local files only, with the fallbacks an offline run needs."""
import os

import torch

import data
import memcheck
from flags import DEFAULT_MODEL, WEIGHTS_FILES, UsageError

# --targets auto, per config.model_type: the attention projections PEFT adapts by default, copied
# from peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (PEFT 0.21; peft is
# not imported at run time). phi3 is not in PEFT's table: its fused query/key/value projection.
# Another model type gets q_proj,v_proj when it has them.
DEFAULT_TARGETS = {
    "opt": ("q_proj", "v_proj"), "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"), "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",), "gpt_neox": ("query_key_value",), "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
}
# A tokenizer this small cannot be the model's: transformers returns a 0-5 token tokenizer for a
# folder without tokenizer files (Qwen2, Gemma, GPT-NeoX, GPT-2, OPT), while real pairs have at
# least 99% as many tokens as embedding rows (Llama 32000/32000, Qwen2 151643/151936, OPT
# 50265/50272). Below MIN_TOKENS tokens, or 1% of the rows, the stand-in is used instead.
MIN_TOKENS = 64
# What a tokenizer is saved as, by the tokenizers library or a slow tokenizer (sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "vocab.json", "vocab.txt", "merges.txt")


def _hf_cache():
    from huggingface_hub.constants import HF_HUB_CACHE
    return HF_HUB_CACHE


def _weights_file(path):
    """The weights file a local model directory loads from, for error messages."""
    for name in WEIGHTS_FILES:
        if os.path.exists(os.path.join(os.path.expanduser(path), name)):
            return os.path.join(path, name)
    return path


def _no_sdpa(error):
    message = memcheck.first_line(error)
    return "scaled_dot_product_attention" in message or "sdpa" in message.lower()


def _load_error(args, error):
    """What failed to load the model, as a UsageError naming the file or the flag to change."""
    message = memcheck.first_line(error)
    if isinstance(error, ValueError):  # transformers' word on the config or the architecture
        return UsageError(f"--model {args.model}: cannot load it as a causal language model ({message})")
    if _config_only(args.model):   # no weights: what failed is the architecture its config gives
        return UsageError(f"--model {args.model}: cannot build the model its config.json gives ({message})")
    if "ignore_mismatched_sizes" in message:   # (its table of tensors went to the silenced log)
        return UsageError(f"--model {args.model}: the weights in {_weights_file(args.model)} do not have the "
                          "shapes its config.json gives; was config.json edited, or saved from another model?")
    # Anything else came from reading the weights: safetensors, torch.load or the file system.
    return UsageError(f"--model {args.model}: cannot read the weights in {_weights_file(args.model)} "
                      f"({type(error).__name__}: {message}); is the file truncated, or still downloading?")


def _read_config(args):
    """The model's config from local files; None for the default model when it is not cached."""
    from transformers import AutoConfig, OPTConfig
    try:
        config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    except OSError as e:
        if os.path.isfile(os.path.join(args.model, "config.json")):
            raise UsageError(f"--model {args.model}: cannot read its config.json "
                             f"({memcheck.first_line(e)})") from e
        if args.model != DEFAULT_MODEL:
            raise UsageError(f"--model {args.model}: not a local model directory and not in the local "
                             f"Hugging Face cache ({_hf_cache()}); nothing is downloaded") from e
        config = None
    except Exception as e:  # no or an unknown model_type; a field of the wrong type; heads that do not divide
        said = " ".join(str(e).split())   # (a field's error comes on the line after its name)
        raise UsageError(f"--model {args.model}: its config.json is not a valid model config "
                         f"({said if len(said) <= 300 else said[:297] + '...'})") from e
    max_positions = getattr(config or OPTConfig(), "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions < 1:
        key = getattr(config, "attribute_map", {}).get("max_position_embeddings",   # GPT-2's: n_positions
                                                       "max_position_embeddings")
        raise UsageError(f"--model {args.model}: its config.json gives {key} {max_positions}; a model "
                         "holds at least one position")
    if max_positions is not None and args.seq > max_positions:  # before the weights are read
        raise UsageError(f"--seq {args.seq}: {args.model} holds at most {max_positions} positions")
    return config


def _config_only(path):
    """A local folder with a config.json and no weights: a model a probe saw built in code, say."""
    return os.path.isdir(os.path.expanduser(path)) and _weights_file(path) == path


def _random_weights(args, config, weights_dtype, meta, attn):
    """The architecture of `config` with seeded random weights (on meta: shapes only)."""
    from transformers import AutoModelForCausalLM
    config._attn_implementation = attn
    torch.manual_seed(args.seed)
    with torch.device("meta" if meta else "cpu"):
        return AutoModelForCausalLM.from_config(config).to(weights_dtype)


def _instantiate(args, config, weights_dtype, meta, attn):
    """(model, where its weights came from): random weights from the config, or the local files."""
    from transformers import AutoModelForCausalLM, OPTConfig
    random = "with seeded random weights (memory does not depend on weight values)"
    if config is not None and _config_only(args.model):
        return (_random_weights(args, config, weights_dtype, meta, attn),
                f"model: {args.model} holds a config.json and no weights; using its architecture {random}")
    if config is None or meta:
        # OPTConfig()'s defaults are exactly opt-125m's
        return (_random_weights(args, config or OPTConfig(), weights_dtype, meta, attn),
                f"model: {DEFAULT_MODEL} is not in the local cache ({_hf_cache()}); using its "
                f"architecture from OPTConfig() {random}")
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                 dtype=weights_dtype, attn_implementation=attn)
    return model, f"model: {args.model} from local files"


def _load_tokenizer(args, model):
    """(the model's tokenizer or None for the stand-in, a note when it is the stand-in)."""
    from transformers import AutoTokenizer
    none = f"tokenizer: none in {args.model}; using the stand-in BPE trained on the catalogue"
    if os.path.isdir(args.model) and not any(os.path.exists(os.path.join(args.model, name))
                                             for name in TOKENIZER_FILES):
        return None, none   # (transformers would make a 0-5 token one of the config's type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except Exception as e:
        if isinstance(e, (OSError, ValueError)) and not os.path.isdir(args.model):
            return None, none   # a model in the cache without tokenizer files
        return None, (f"tokenizer: cannot read the one in {args.model} ({memcheck.first_line(e)}); "
                      "using the stand-in BPE trained on the catalogue")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) < max(MIN_TOKENS, rows / 100):
        # Resizing to a folder's 0-5 token tokenizer would shrink the vocabulary, and the run
        # would measure a different model.
        return None, (f"tokenizer: the one in {args.model} has {len(tokenizer)} token(s) for "
                      f"{rows} embedding rows, so it cannot be the model's (a folder without tokenizer "
                      "files); using the stand-in BPE trained on the catalogue")
    return tokenizer, None


def load_model(args, weights_dtype, meta=False):
    """(model, tokenizer or None, lines saying where the weights came from). Never downloads.

    meta=True builds the same architecture on the meta device: shapes only, no memory, for the
    budget. The attention that ran is the model's config._attn_implementation.
    """
    from transformers.utils import logging
    logging.set_verbosity_error()  # keep the output to the figures; errors still show
    logging.disable_progress_bar()
    config = _read_config(args)
    notes, attn = [], args.attn
    while True:
        try:
            model, source = _instantiate(args, config, weights_dtype, meta, attn)
            break
        except Exception as e:
            if memcheck.is_out_of_memory(e):  # the weights did not fit: that is the finding
                raise
            if attn != "sdpa" or not _no_sdpa(e):
                raise _load_error(args, e) from e
            # Bloom, Gemma2: fall back as transformers' own default would; the budget reads the
            # model's config, so it follows.
            notes.append(f"attention: {type(config).__name__.removesuffix('Config')} does not support "
                         "PyTorch's scaled_dot_product_attention; using eager attention (it stores "
                         "bs x heads x seq^2 scores; the budget counts them)")
            attn = "eager"
    decoder_layers(model)   # none: said now, not as unknown --targets
    if getattr(model.config, "num_attention_heads", None) is None:   # Mamba, RWKV: what the budget reads
        raise UsageError(f"--model {args.model}: {model.config.model_type} has no attention heads; the "
                         "budget and this loop cover transformer decoders (attention and MLP layers)")
    tokenizer, note = _load_tokenizer(args, model)
    return model, tokenizer, "\n".join([source, *notes, *([note] if note else [])])


def prepare_vocabulary(model, tokenizer, stand_in, add_tokens=True, mean_resizing=True, vocab=None):
    """Add the placeholder tokens and resize the embeddings, as the real stack does (--add-tokens),
    or to `vocab` rows (--vocab); returns the line that says so.

    A stand-in tokenizer trained here has a small vocabulary of its own, so the model keeps its size
    and grows by the added tokens, as it would with its real tokenizer (and never has fewer rows
    than the stand-in has tokens). Without --add-tokens or --vocab nothing is resized. A tokenizer
    with more tokens than the embeddings get rows is refused.
    """
    rows = model.get_input_embeddings().num_embeddings
    added = data.add_special_tokens(tokenizer) if add_tokens else 0
    if vocab:
        size, why = vocab, "--vocab"
    elif not add_tokens:
        size, why = rows, "no token added"
    elif stand_in:   # (its own vocabulary is small: the model keeps its rows)
        size, why = max(rows + added, len(tokenizer)), f"{added} placeholder tokens added"
    else:
        size, why = len(tokenizer), f"the tokenizer's {len(tokenizer) - added} tokens + {added} added"
    if len(tokenizer) > size:
        flag = f"--vocab {vocab}" if vocab else "--no-add-tokens"
        raise UsageError(f"{flag}: the {'stand-in ' if stand_in else ''}tokenizer has {len(tokenizer)} "
                         f"tokens{' with the placeholders' * bool(added)} for {size} embedding rows, so its "
                         f"ids would index past them; use --vocab {len(tokenizer)} or more"
                         + ("" if vocab else ", or --add-tokens (it resizes the embeddings)")
                         + (" (the stand-in is a byte-level BPE: 258 tokens at least)" * stand_in))
    if size != rows:
        model.resize_token_embeddings(size, mean_resizing=mean_resizing)
    return f"vocabulary: {rows} embedding rows{f', resized to {size}' if size != rows else ''} ({why})"


def resolve_targets(model, targets, known):
    """--targets with "auto" replaced by the model type's default (DEFAULT_TARGETS)."""
    if "auto" not in targets:
        return tuple(targets)
    model_type = getattr(model.config, "model_type", None)
    default = DEFAULT_TARGETS.get(model_type)
    if default is None and {"q_proj", "v_proj"} <= set(known):
        default = ("q_proj", "v_proj")
    if default is None:
        raise UsageError(f"--targets auto: no default targets for model type {model_type}; name them: "
                         f"the decoder's linear layers are {', '.join(known) or 'none'}, or all-linear")
    return tuple(dict.fromkeys(n for t in targets for n in (default if t == "auto" else (t,))))


def decoder_layers(model):
    layers = memcheck.decoder_layers(model)
    if not layers:
        raise UsageError(f"--model {model.name_or_path}: " + (
            f"no list of {model.config.num_hidden_layers} decoder layers found" if layers is None else
            f"no decoder layers (num_hidden_layers {model.config.num_hidden_layers}): nothing to adapt "
            "or checkpoint"))
    return layers
