"""An independent reference for path patching: plain torch hooks on plain HF modules (Llama,
Qwen2, Gemma 3), written out here with no engine code, in the model's own dtype.

Senders' changes are read off the two runs by hand (a head: its z columns times its W_O
columns; under Gemma's post-attention norm the norm is called on the clean attention output
plus that change); receivers are edited by forward hooks on their projection (or the MLP, or a
pre-hook on the final norm) that recompute the module on the edited input; an ungrouped key or
value is given to one query head by replacing the model's eager attention function with one
that expands the keys per query head first.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

Hook = Callable[..., Any]


class PlainRef:
    """Runs of a plain HF Llama/Qwen2/Gemma 3 with hand-written edits."""

    def __init__(self, hf: Any, target: list[int]) -> None:
        self.hf = hf
        self.layers = list(hf.model.layers)
        self.gemma = hasattr(self.layers[0], "pre_feedforward_layernorm")
        self.target = torch.tensor(target)
        attn = self.layers[0].self_attn
        self.e = attn.head_dim
        self.group = attn.num_key_value_groups

    # ------------------------------------------------------------------ modules
    def mlp_norm(self, i: int) -> Any:
        layer = self.layers[i]
        return layer.pre_feedforward_layernorm if self.gemma else layer.post_attention_layernorm

    def mlp_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP's contribution to the residual from its input (resid_mid)."""
        layer = self.layers[i]
        out = layer.mlp(self.mlp_norm(i)(x))
        return layer.post_feedforward_layernorm(out) if self.gemma else out

    # ------------------------------------------------------------------ runs
    def run(self, ids: torch.Tensor, hooks: list[tuple[Any, str, Hook]] | None = None, grad: bool = False) -> dict[str, Any]:
        """Forward pass recording, per layer: resid_pre, z, S (o_proj output), the attention's
        and MLP's contributions, resid_mid; the final norm's input; the metric."""
        rec: dict[str, Any] = {"pre": {}, "z": {}, "S": {}, "attn": {}, "mlp": {}, "mid": {}}
        handles = []
        for i, layer in enumerate(self.layers):
            def pre(m: Any, a: Any, i: int = i) -> None:
                rec["pre"][i] = a[0].detach().clone()

            def z(m: Any, a: Any, i: int = i) -> None:
                rec["z"][i] = a[0].detach().clone()

            def s(m: Any, a: Any, o: Any, i: int = i) -> None:
                rec["S"][i] = o.detach().clone()

            def mid(m: Any, a: Any, i: int = i) -> None:
                rec["mid"][i] = a[0].detach().clone()

            handles += [layer.input_layernorm.register_forward_pre_hook(pre),
                        layer.self_attn.o_proj.register_forward_pre_hook(z),
                        layer.self_attn.o_proj.register_forward_hook(s),
                        self.mlp_norm(i).register_forward_pre_hook(mid)]
        handles.append(self.hf.model.norm.register_forward_pre_hook(
            lambda m, a: rec.__setitem__("final", a[0].detach().clone())))
        for module, kind, fn in hooks or []:
            reg = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(reg(fn))
        try:
            with torch.set_grad_enabled(grad):
                logits = self.hf(ids).logits
        finally:
            for h in handles:
                h.remove()
        for i in range(len(self.layers)):
            post = self.layers[i].post_attention_layernorm
            rec["attn"][i] = post(rec["S"][i]) if self.gemma else rec["S"][i]
            nxt = rec["pre"][i + 1] if i + 1 < len(self.layers) else rec["final"]
            rec["mlp"][i] = nxt - rec["mid"][i]
        # The MLP's contribution recomputed from its input (as the receiver maps do), not as
        # a difference of residuals (which rounds).
        with torch.no_grad():
            rec["contrib"] = {i: self.mlp_block(i, rec["mid"][i]) for i in range(len(self.layers))}
        logp = torch.log_softmax(logits[:, -1], dim=-1)
        rec["metric"] = logp.gather(1, self.target[:, None])[:, 0]
        return rec

    # ------------------------------------------------------------------ senders
    def change(self, clean: dict[str, Any], corrupt: dict[str, Any], senders: list[tuple]) -> torch.Tensor:
        """The residual change when the senders take the corrupt run's output (heads of a layer
        through Gemma's post-attention norm together)."""
        total = torch.zeros_like(clean["pre"][0])
        heads: dict[int, list[int]] = {}
        for s in senders:
            if s[0] == "embed":
                total = total + corrupt["pre"][0] - clean["pre"][0]
            elif s[0] == "mlp":
                total = total + self.mlp_block(s[1], corrupt["mid"][s[1]]) - self.mlp_block(s[1], clean["mid"][s[1]])
            else:
                heads.setdefault(s[1], []).append(s[2])
        for i, hs in heads.items():
            w = self.layers[i].self_attn.o_proj.weight
            d = torch.zeros_like(total)
            for h in hs:
                cols = slice(h * self.e, (h + 1) * self.e)
                d = d + (corrupt["z"][i][..., cols] - clean["z"][i][..., cols]) @ w[:, cols].T
            if self.gemma:
                post = self.layers[i].post_attention_layernorm
                d = post(clean["S"][i] + d) - post(clean["S"][i])
            total = total + d
        return total

    # ------------------------------------------------------------------ receivers
    def receiver_hooks(self, receiver: tuple, given: Callable[[torch.Tensor], torch.Tensor]) -> list[tuple[Any, str, Hook]]:
        """Hooks that make the receiver compute from ``given(its live input)``."""
        kind = receiver[0]
        if kind == "logits":
            return [(self.hf.model.norm, "pre", lambda m, a: (given(a[0]), *a[1:]))]
        i = receiver[1]
        layer = self.layers[i]
        box: dict[str, torch.Tensor] = {}
        if kind == "mlp":
            def grab_mid(m: Any, a: Any) -> None:
                box["x"] = a[0]

            return [(self.mlp_norm(i), "pre", grab_mid),
                    (layer.mlp, "fwd", lambda m, a, o: layer.mlp.forward(self.mlp_norm(i).forward(given(box["x"]))))]

        def grab(m: Any, a: Any) -> None:
            box["x"] = a[0]

        proj = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj}[kind]
        cols = slice(receiver[2] * self.e, (receiver[2] + 1) * self.e)

        def edit(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
            o = o.clone()
            # .forward: calling the modules would fire the hooks on them (and this one) again.
            o[..., cols] = proj.forward(layer.input_layernorm.forward(given(box["x"])))[..., cols]
            return o

        return [(layer.input_layernorm, "pre", grab), (proj, "fwd", edit)]

    def input_of(self, rec: dict[str, Any], receiver: tuple) -> torch.Tensor:
        if receiver[0] == "logits":
            return rec["final"]
        return rec["mid"][receiver[1]] if receiver[0] == "mlp" else rec["pre"][receiver[1]]

    # ------------------------------------------------------------------ modes
    def direct(self, ids: torch.Tensor, clean: dict, corrupt: dict, senders: list[tuple], receiver: tuple) -> torch.Tensor:
        delta = self.change(clean, corrupt, senders)
        return self.edited(ids, receiver, lambda x: x + delta)

    def frozen_inputs(self, ids: torch.Tensor, clean: dict, corrupt: dict, senders: list[tuple]) -> dict:
        """Wang et al.'s first pass: every head's z frozen to clean except the senders' (corrupt),
        MLP senders at the corrupt MLP output, MLPs otherwise recomputed."""
        hooks: list[tuple[Any, str, Hook]] = []
        for i, layer in enumerate(self.layers):
            def freeze(m: Any, a: Any, i: int = i) -> tuple:
                z = clean["z"][i].clone()
                for s in senders:
                    if s[0] == "head" and s[1] == i:
                        cols = slice(s[2] * self.e, (s[2] + 1) * self.e)
                        z[..., cols] = corrupt["z"][i][..., cols]
                return (z,)

            hooks.append((layer.self_attn.o_proj, "pre", freeze))
        for s in senders:
            if s[0] == "mlp":
                corrupt_out = self.layers[s[1]].mlp(self.mlp_norm(s[1])(corrupt["mid"][s[1]]))
                hooks.append((self.layers[s[1]].mlp, "fwd", lambda m, a, o, c=corrupt_out: c))
            if s[0] == "embed":
                hooks.append((self.hf.model.embed_tokens, "fwd", lambda m, a, o: corrupt["pre"][0]))
        return self.run(ids, hooks)

    def frozen(self, ids: torch.Tensor, clean: dict, corrupt: dict, senders: list[tuple], receiver: tuple) -> torch.Tensor:
        step1 = self.frozen_inputs(ids, clean, corrupt, senders)
        x1 = self.input_of(step1, receiver)
        return self.edited(ids, receiver, lambda x: x1)

    def edited(self, ids: torch.Tensor, receiver: tuple, given: Callable[[torch.Tensor], torch.Tensor],
               extra: list[tuple[Any, str, Hook]] | None = None) -> torch.Tensor:
        if receiver[0] in ("kq", "vq"):
            return self.ungrouped(ids, receiver, given)
        return self.run(ids, self.receiver_hooks(receiver, given) + (extra or []))["metric"]

    def slope(self, ids: torch.Tensor, receiver: tuple, delta: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
        """d metric / d eps at eps = 0 per prompt, the receiver reading its input + eps * delta and
        the residual entering layer 0 set to ``entry``: autograd on the plain model."""
        eps = torch.zeros(ids.shape[0], 1, 1, dtype=delta.dtype, requires_grad=True)
        hooks = [*self.receiver_hooks(receiver, lambda x: x + eps * delta), self.embedding_hook(entry)]
        metric = self.run(ids, hooks, grad=True)["metric"]
        (g,) = torch.autograd.grad(metric.sum(), [eps])
        return g.flatten().detach()

    def embedding_hook(self, value: torch.Tensor) -> tuple[Any, str, Hook]:
        """A hook that makes the residual entering layer 0 ``value``."""
        return (self.hf.model.embed_tokens, "fwd", lambda m, a, o: value)

    # ------------------------------------------------------------------ ungrouped
    def ungrouped(self, ids: torch.Tensor, receiver: tuple, given: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Query head H alone sees its group's key (or value) computed from the edited input:
        a first run with the group's projection edited records that key or value after rotary
        and QK-norm; a second run's attention expands keys and values per query head and gives
        head H the recorded one."""
        kind, i, h = receiver
        grouped = ("k" if kind == "kq" else "v", i, h // self.group)
        attn = self.layers[i].self_attn
        seen: dict[str, torch.Tensor] = {}
        with self._attention(attn, record=seen):
            self.run(ids, self.receiver_hooks(grouped, given))
        with self._attention(attn, give=(h, kind, seen)):
            return self.run(ids)["metric"]

    @contextlib.contextmanager
    def _attention(self, attn: Any, record: dict | None = None, give: tuple | None = None) -> Iterator[None]:
        module = sys.modules[type(attn).__module__]
        original = module.eager_attention_forward

        def per_query_head(mod: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
            if mod is not attn:
                return original(mod, query, key, value, attention_mask, *args, **kwargs)
            if record is not None:
                record["k"], record["v"] = key.clone(), value.clone()
                return original(mod, query, key, value, attention_mask, *args, **kwargs)
            assert give is not None
            h, kind, seen = give
            k = key.repeat_interleave(self.group, dim=1)
            v = value.repeat_interleave(self.group, dim=1)
            g = h // self.group
            if kind == "kq":
                k[:, h] = seen["k"][:, g]
            else:
                v[:, h] = seen["v"][:, g]
            w = query @ k.transpose(2, 3) * kwargs["scaling"]
            if attention_mask is not None:
                w = w + attention_mask[:, :, :, : k.shape[-2]]
            w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
            return (w @ v).transpose(1, 2).contiguous(), w

        setattr(module, "eager_attention_forward", per_query_head)  # noqa: B010 (a module global)
        try:
            yield
        finally:
            setattr(module, "eager_attention_forward", original)  # noqa: B010

    # ------------------------------------------------------------------ circuits
    def circuit(self, ids: torch.Tensor, clean: dict, corrupt: dict, kept: set[tuple[tuple, tuple]]) -> torch.Tensor:
        """The clean prompt with every edge outside ``kept`` carrying the corrupt value: every
        q/k/v head slice, MLP and the final norm recompute from their own input = the corrupt
        run's input + sum over kept senders of (live output - corrupt output); the kept heads
        of one layer go through Gemma's post-attention norm together."""
        live: dict[tuple, torch.Tensor] = {}
        into: dict[tuple, list[tuple]] = {}
        for s, r in kept:
            into.setdefault(r, []).append(s)

        def input_of(r: tuple) -> torch.Tensor:
            x = self.input_of(corrupt, r).clone()
            heads: dict[int, list[int]] = {}
            for s in into.get(r, []):
                if s[0] == "embed":
                    x = x + clean["pre"][0] - corrupt["pre"][0]
                elif s[0] == "mlp":
                    x = x + live[("mlp", s[1])] - corrupt["contrib"][s[1]]
                else:
                    heads.setdefault(s[1], []).append(s[2])
            for i, hs in heads.items():
                w = self.layers[i].self_attn.o_proj.weight
                d = torch.zeros_like(x)
                for h in hs:
                    cols = slice(h * self.e, (h + 1) * self.e)
                    d = d + (live[("z", i)][..., cols] - corrupt["z"][i][..., cols]) @ w[:, cols].T
                if self.gemma:
                    post = self.layers[i].post_attention_layernorm
                    d = post(corrupt["S"][i] + d) - post(corrupt["S"][i])
                x = x + d
            return x

        hooks: list[tuple[Any, str, Hook]] = []
        n_kv = self.layers[0].self_attn.k_proj.out_features // self.e
        n_q = self.layers[0].self_attn.q_proj.out_features // self.e
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            for kind, proj, n in (("q", attn.q_proj, n_q), ("k", attn.k_proj, n_kv), ("v", attn.v_proj, n_kv)):
                def edit(m: Any, a: Any, o: torch.Tensor, i: int = i, kind: str = kind, proj: Any = proj,
                         n: int = n, layer: Any = layer) -> torch.Tensor:
                    o = o.clone()
                    for h in range(n):
                        cols = slice(h * self.e, (h + 1) * self.e)
                        o[..., cols] = proj.forward(layer.input_layernorm.forward(input_of((kind, i, h))))[..., cols]
                    return o

                hooks.append((proj, "fwd", edit))
            hooks.append((attn.o_proj, "pre", lambda m, a, i=i: live.__setitem__(("z", i), a[0])))

            def mlp(m: Any, a: Any, o: torch.Tensor, i: int = i, layer: Any = layer) -> torch.Tensor:
                out = layer.mlp.forward(self.mlp_norm(i).forward(input_of(("mlp", i))))
                post = layer.post_feedforward_layernorm.forward(out) if self.gemma else out
                live[("mlp", i)] = post
                return out

            hooks.append((layer.mlp, "fwd", mlp))
        hooks.append((self.hf.model.norm, "pre", lambda m, a: (input_of(("logits",)),)))
        return self.run(ids, hooks)["metric"]
