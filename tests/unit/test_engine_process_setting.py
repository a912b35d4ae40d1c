"""Running an engine in a child process is a generic engine setting, offered by the engines that declare it.

Nothing is started here: the command line's answer, the registry's refusal, and the parent's
proxy class, which must be the engine's own class (its declarations inherited, none copied).
"""

from __future__ import annotations

import pytest

from engines import EngineConfig, create_engine
from engines.base import Engine
from engines.process.proxy import ChildProcessEngine, in_child_process
from engines.registry import EngineSettingRefused, child_process_engines, engine_class, engine_names
from server.cli import build_parser, config_from_args


def test_only_the_engines_that_declare_it_offer_the_setting():
    offered = child_process_engines()
    assert offered, "no engine offers --engine-process"
    for name in offered:
        assert engine_class(name).runs_in_child_process
    assert Engine.runs_in_child_process is False


def test_the_flag_is_generic_and_refused_by_an_engine_that_cannot_by_name(capsys):
    name = child_process_engines()[0]
    assert config_from_args(build_parser().parse_args(["--engine", name, "--engine-process"])).engine_process
    assert not config_from_args(build_parser().parse_args(["--engine", name])).engine_process
    cannot = next(n for n in engine_names() if n not in child_process_engines())
    with pytest.raises(SystemExit) as refused:
        config_from_args(build_parser().parse_args(["--engine", cannot, "--engine-process"]))
    message = str(refused.value)
    assert "\n" not in message and f"engine {cannot} cannot run in an engine process" in message
    assert all(offered in message for offered in child_process_engines())


def test_the_registry_refuses_it_too():
    cannot = next(n for n in engine_names() if n not in child_process_engines())
    with pytest.raises(EngineSettingRefused, match="engines that can"):
        create_engine(cannot, EngineConfig(model="tiny-llama", engine_process=True))


def test_the_proxy_is_the_engines_own_class_with_its_seam_relayed():
    name = child_process_engines()[0]
    cls = engine_class(name)
    proxy = create_engine(name, EngineConfig(model="tiny-llama", engine_process=True))
    assert isinstance(proxy, ChildProcessEngine) and isinstance(proxy, cls)
    assert (proxy.name, proxy.Options, proxy.offers_logprobs) == (cls.name, cls.Options, cls.offers_logprobs)
    # The seam's instance hooks are the relays', whatever the engine overrides.
    for hook in ("start", "info", "stream_tokens", "score_ids", "prompt_logprobs", "check_params", "score_context"):
        assert getattr(type(proxy), hook) is getattr(ChildProcessEngine, hook), hook


def test_what_an_engine_class_adds_reaches_the_proxy_uncopied():
    """A declaration the proxy knows nothing of, and an engine's own tokenizer loading, are still there."""
    base = engine_class(child_process_engines()[0])

    def own_tokenizer(cls, info):
        return ("tokenizer of", cls.__name__, info)

    engine = type("Custom", (base,), {"extra": "kept", "load_tokenizer": classmethod(own_tokenizer)})
    proxy = in_child_process(engine)
    assert proxy.extra == "kept"
    assert proxy.load_tokenizer("info") == ("tokenizer of", proxy.__name__, "info")
