"""Hyperparameter checks that need the base model or several fields, run when a job is created.

A job the platform cannot train, or whose adapter serving cannot apply, is a 422 naming the
field now, rather than a ``worker_lost`` after retries or an adapter nobody can use
(docs/API.md, "Limits"). Bounds on single fields live on the method's hyperparameter model
in ``workers.spec``.
"""

from __future__ import annotations

import time

import regex  # like re, plus a timeout: a tenant's target_modules regex must not hang the API

from service.catalog.architectures import (
    ASSUMED_LAYERS,
    SERVABLE_LINEAR,
    ModelFacts,
    facts_for,
    full_names,
    has_llama_layout,
)
from service.db.models import BaseModelRow
from service.errors import ValidationFailed
from workers.spec import (
    MAX_EFFECTIVE_BATCH,
    MAX_MICRO_BATCH_TOKENS,
    GROWABLE_INITS,
    AdaLoraHyperparameters,
    Hyperparameters,
    IA3Hyperparameters,
    PrefixTuningHyperparameters,
    PromptTuningHyperparameters,
    PTuningHyperparameters,
    TrainingHyperparameters,
)

CODE = "invalid_hyperparameters"
REGEX_BUDGET_S = 0.05  # matching one tenant regex against every module name
# LoRA initialisations that rewrite the base's weights; published converted to a plain LoRA of
# the original base, whose rank is twice the trained one (workers.train.methods).
REWRITES_BASE = ("pissa", "olora")


def check_hyperparameters(base: BaseModelRow, hp: TrainingHyperparameters, *, param: str,
                          method: str = "lora") -> None:
    """Raise ValidationFailed (``invalid_hyperparameters``, ``param`` = ``<param>.<field>``) for
    the first limit ``hp`` (``method``'s hyperparameters) breaks on ``base``. ``param``: e.g.
    ``method.lora.hyperparameters``."""

    def refuse(field: str, message: str) -> None:
        raise ValidationFailed(message, code=CODE, param=f"{param}.{field}")

    facts = facts_for(base.source_uri, base.architecture)
    # Virtual tokens take context positions before every example.
    virtual = getattr(hp, "num_virtual_tokens", 0)
    if facts.context is not None and hp.max_seq_length + virtual > facts.context:
        refuse("max_seq_length", f"max_seq_length={hp.max_seq_length}"
                                 f"{f' + num_virtual_tokens={virtual}' if virtual else ''} exceeds the "
                                 f"context of {base.id} ({facts.context} tokens)")
    if hp.batch_size * hp.gradient_accumulation_steps > MAX_EFFECTIVE_BATCH:
        refuse("gradient_accumulation_steps",
               f"batch_size x gradient_accumulation_steps = "
               f"{hp.batch_size * hp.gradient_accumulation_steps}; the limit is {MAX_EFFECTIVE_BATCH}")
    if hp.batch_size * hp.max_seq_length > MAX_MICRO_BATCH_TOKENS:
        refuse("batch_size", f"batch_size x max_seq_length = {hp.batch_size * hp.max_seq_length} "
                             f"tokens per step; the limit is {MAX_MICRO_BATCH_TOKENS}")
    targets = getattr(hp, "target_modules", None)
    if targets is not None and (problem := target_modules_problem(targets, facts)) is not None:
        refuse("target_modules", problem)
    if isinstance(hp, Hyperparameters):
        _check_lora(base, facts, hp, method, refuse)
    elif isinstance(hp, AdaLoraHyperparameters):
        if hp.init_r > base.max_rank:
            refuse("init_r", f"init_r={hp.init_r} exceeds the maximum rank {base.max_rank} of {base.id}")
        if hp.target_r > hp.init_r:
            refuse("target_r", f"target_r={hp.target_r} exceeds init_r={hp.init_r}: AdaLoRA only prunes")
    elif isinstance(hp, IA3Hyperparameters):
        _check_ia3(facts, hp, refuse)
    elif isinstance(hp, PrefixTuningHyperparameters):
        if hp.encoder_hidden_size is not None and not hp.prefix_projection:
            refuse("encoder_hidden_size", "encoder_hidden_size sizes the prefix projection; it needs "
                                          "prefix_projection: true")
    elif isinstance(hp, PromptTuningHyperparameters):
        if (hp.init == "text") != (hp.init_text is not None):
            refuse("init_text", "init_text is required with init: 'text', and only then")
    elif isinstance(hp, PTuningHyperparameters):
        if hp.encoder_reparameterization_type == "MLP" and hp.encoder_num_layers != 2:
            refuse("encoder_num_layers", "the MLP prompt encoder has exactly 2 layers (PEFT ignores another "
                                         "count); encoder_num_layers sizes the LSTM encoder only")


def _check_lora(base: BaseModelRow, facts: ModelFacts, hp: Hyperparameters, method: str, refuse) -> None:
    if hp.rank_schedule:
        _check_rank_schedule(base, hp, refuse)
    doubled = hp.init_lora_weights in REWRITES_BASE
    if (2 * hp.r if doubled else hp.r) > base.max_rank:
        why = f" (init_lora_weights={hp.init_lora_weights!r} publishes rank 2r)" if doubled else ""
        refuse("r", f"r={hp.r} exceeds the maximum rank {base.max_rank} of {base.id}{why}")
    if hp.bias != "none" and not has_llama_layout(facts):
        # Serving applies trained biases of the seven layers it wraps: in a Llama layout those
        # are all the biased layers there are; elsewhere "all" could train one it cannot apply.
        refuse("bias", f"bias={hp.bias!r} needs a base model of a known architecture (serving "
                       f"applies trained biases only to {', '.join(SERVABLE_LINEAR)}); use 'none'")
    if hp.modules_to_save:
        # A full trained copy of a module per adapter: the shared base has one of each, and a
        # batch row cannot swap in its own.
        refuse("modules_to_save", "serving applies adapters to the shared base's layers and cannot "
                                  "swap in a tenant's own copy of a whole module; leave modules_to_save unset")
    if hp.init_lora_weights in REWRITES_BASE and method == "qlora":
        # PiSSA/OLoRA take the base's top singular directions into the adapter and keep the
        # residual. On a 4-bit base that residual would be re-quantised (PEFT refuses PiSSA on
        # quantised weights outright), and the adapter converted back to the shared NF4 base
        # would no longer be the one trained.
        refuse("init_lora_weights", f"init_lora_weights={hp.init_lora_weights!r} rewrites the base "
                                    "weights, which a 4-bit base cannot take exactly; use method 'lora' "
                                    "or another initialisation")
    if hp.init_lora_weights == "orthogonal" and hp.r % 2:
        refuse("r", "init_lora_weights='orthogonal' needs an even r")


def _check_rank_schedule(base: BaseModelRow, hp: Hyperparameters, refuse) -> None:
    """Progressive rank growth (workers.train.rank_growth) pads B with zero columns and A with
    rows drawn at the start, so that each switch keeps the model's function; the final stage must
    be reached, since the published adapter has the final rank, ``r``."""
    (last_epoch, final), field = hp.rank_schedule[-1], "rank_schedule"
    if final > base.max_rank:
        refuse(field, f"rank_schedule grows to rank {final}, above the maximum rank {base.max_rank} of {base.id}")
    if hp.r != final:
        refuse("r", f"r={hp.r} but rank_schedule ends at rank {final}: with a schedule, r is the final "
                    f"(published) rank; leave r out or set it to {final}")
    if last_epoch >= hp.n_epochs:
        refuse(field, f"rank_schedule starts a stage at epoch {last_epoch} (counted from 0), but the job "
                      f"trains {hp.n_epochs} epochs (n_epochs; when left `auto`, chosen from the training "
                      f"file): set n_epochs above {last_epoch} or start the stage earlier")
    if hp.init_lora_weights not in GROWABLE_INITS:
        refuse(field, f"init_lora_weights={hp.init_lora_weights!r} starts with B non-zero (or rewrites the "
                      f"base), so adding rank would change the model; use one of {GROWABLE_INITS}")


def _check_ia3(facts: ModelFacts, hp: IA3Hyperparameters, refuse) -> None:
    problem = target_modules_problem(hp.feedforward_modules, facts)
    if problem is not None:
        refuse("feedforward_modules", problem.replace("target_modules", "feedforward_modules"))
    if isinstance(hp.target_modules, list):
        outside = [m for m in hp.feedforward_modules if m not in hp.target_modules]
        if outside:
            refuse("feedforward_modules", f"feedforward_modules must also be target modules; "
                                          f"{', '.join(map(repr, outside))} is not in target_modules")


def target_modules_problem(targets: list[str] | str, facts: ModelFacts) -> str | None:
    """Why ``targets`` cannot be trained and served on this base, or None."""
    if targets == "all-linear":
        # PEFT's all-linear: every linear but the output layer, i.e. exactly the servable ones
        # for a Llama layout; for other architectures we cannot tell here.
        return None
    if isinstance(targets, str):
        return _regex_problem(targets, facts)
    bad = [t for t in dict.fromkeys(targets) if not _name_ok(t, facts)]
    if bad:
        shown = ", ".join(repr(t) for t in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        return (f"target_modules names modules that {'this base model lacks or ' if has_llama_layout(facts) else ''}"
                f"serving cannot apply LoRA to: {shown}; use some of {', '.join(SERVABLE_LINEAR)}")
    return None


def _name_ok(target: str, facts: ModelFacts) -> bool:
    """PEFT matches a name when a module's full name equals it or ends with ``.<name>``: the
    name must be a dotted suffix of ``model.layers.<i>.<block>.<linear>`` for a real layer."""
    parts = target.split(".")
    block = SERVABLE_LINEAR.get(parts[-1])
    if block is None:
        return False
    if not has_llama_layout(facts):
        return True  # unknown layout: the layer name is all we can check
    pattern = ["model", "layers", None, block, parts[-1]]  # None: a layer index
    if len(parts) > len(pattern):
        return False
    for want, got in zip(reversed(pattern), reversed(parts)):
        if want is None:
            if not (got.isascii() and got.isdigit()) or (facts.layers is not None and int(got) >= facts.layers):
                return False
        elif got != want:
            return False
    return True


def _regex_problem(pattern: str, facts: ModelFacts) -> str | None:
    """A regex (PEFT full-match) must match some servable layer and nothing else, and must
    not be one that backtracks for ages in the worker (PEFT matches with stdlib ``re``, which
    has no timeout: ``(\\w+|\\.)*x`` takes seconds per module name)."""
    if _nested_repetition(pattern):
        return ("the target_modules regex repeats a group that itself repeats or alternates, "
                "which can take exponential time; list the module names instead")
    if not has_llama_layout(facts):
        return None  # we do not know this model's module names
    servable, others = full_names(facts.layers or ASSUMED_LAYERS)
    deadline = time.monotonic() + REGEX_BUDGET_S
    try:
        compiled = regex.compile(pattern)
        hits, wrong = 0, []
        for name in servable:
            hits += compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 0.001)) is not None
        for name in others:
            if compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 0.001)) is not None:
                wrong.append(name)
    except TimeoutError:
        return "the target_modules regex takes too long to match module names; simplify it"
    except Exception:  # noqa: BLE001 - regex.error, or anything else the engine throws: a 422
        return "target_modules is not a regex this platform can use"
    if wrong:
        return (f"the target_modules regex matches modules serving cannot apply LoRA to: "
                f"{', '.join(wrong[:5])}")
    if not hits:
        return "the target_modules regex matches no layer of this base model"
    return None


def _nested_repetition(pattern: str) -> bool:
    """Whether a repeat (``*``, ``+``, ``{m,n}`` with n > 1) holds another repeat, an
    alternation or a back-reference: the shapes of catastrophic backtracking."""
    from re import _parser  # the stdlib's own parse tree: what PEFT's re.fullmatch will run

    repeats = {_parser.MAX_REPEAT, _parser.MIN_REPEAT, getattr(_parser, "POSSESSIVE_REPEAT", None)}
    risky = {_parser.BRANCH, _parser.GROUPREF, _parser.GROUPREF_EXISTS}

    def walk(items, inside_repeat: bool) -> bool:
        for op, arg in items:
            if op in repeats:
                lo, hi, body = arg
                many = hi is _parser.MAXREPEAT or hi > 1
                if many and inside_repeat:
                    return True
                if walk(body, inside_repeat or many):
                    return True
            elif op in risky and inside_repeat:
                return True
            elif op == _parser.SUBPATTERN and walk(arg[-1], inside_repeat):
                return True
            elif op == _parser.BRANCH and any(walk(b, inside_repeat) for b in arg[1]):
                return True
            elif op in (_parser.ASSERT, _parser.ASSERT_NOT) and walk(arg[1], inside_repeat):
                return True
        return False

    try:
        return walk(_parser.parse(pattern), False)
    except Exception:  # noqa: BLE001 - unparsable: compile() reports it
        return False
