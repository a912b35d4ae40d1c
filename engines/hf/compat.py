"""Where the engines reach past transformers' public surface: checked against transformers 5.19.

Each function here reads or takes a private member because transformers offers no public
way to do what it does.  They stand in this one module so that an upgrade of transformers
(the hf extra pins 5.19.x) has one place to check again, and so that no other module
names a private member of the library.
"""

from __future__ import annotations

from typing import Any


def drop_result_handler(manager: Any, request_id: str) -> None:
    """Forgets a request's result handler in a ``ContinuousBatchingManager``.

    The manager drops a handler itself only when its request finishes, which a cancelled
    request never does, and ``register_result_handler`` has no public counterpart.  The
    handler table is guarded by the output router's private ``_lock``, which the manager's
    thread holds while it delivers, so it is taken here too.
    """
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(request_id, None)


def attn_implementation(config: Any) -> str:
    """The attention implementation a loaded model runs, as its config records it.

    ``config._attn_implementation`` is set by ``attn_implementation=``, by
    ``set_attn_implementation`` and by the continuous-batching manager (``paged|…``);
    transformers has no public getter for it.
    """
    return config._attn_implementation


def class_supports_sdpa(model_class: Any) -> bool:
    """Whether a model class declares SDPA support (its ``_supports_sdpa`` flag).

    Read from the class, so it is known before any weights load; the public check
    (``get_correct_attn_implementation``) needs a built model.
    """
    return bool(getattr(model_class, "_supports_sdpa", False))
