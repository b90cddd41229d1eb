"""peft's LoRA linear layer, forward and backward in one autograd function (issue 14).

peft computes y = base(x) + lora_B(lora_A(dropout(x))) * scaling as separate ops: the scaling multiplies and the
sum adds a (tokens, out_features) tensor, backward multiplies the gradient by the scaling at that width again and
adds the two input gradients at (tokens, in_features). Here the scaling goes into the rank-wide matmuls and the sums
into addmm's accumulate, without those passes over memory. The adapter's matmuls run in the compute dtype, as under
autocast (bf16 next to a bf16 base; peft upcasts them to the adapter's float32 and casts every (tokens, out) result
back): A and B are cast once per call (r x in and out x r: small), their gradients return in their own dtype, and
the optimizer keeps float32 weights (issue 27; the fidelity against float32 is tested in tests/test_policy.py).
Saved for backward: dropout(x) and x A^T in the compute dtype. The dropout module and its masks are peft's. Layers
peft does something else with (a disabled or merged adapter, several active ones, DoRA and other variants, a bias on
lora_B, a base that is not nn.Linear) keep peft's own forward.
"""

import types

import torch


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (xd A^T) B^T, where xd = dropout(x) (the same tensor as x without dropout)."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_A, lora_B, scaling):
        base = torch.nn.functional.linear(x, weight, bias)  # (..., out)
        # the adapter's matmuls in the compute dtype (bf16 next to a bf16 base, as under autocast; its weights and
        # their gradients stay in their own dtype): float32 matmuls and (tokens, out) casts cost more than the base
        A, B = lora_A.to(base.dtype), lora_B.to(base.dtype)  # (r, in), (out, r): small
        h = xd.reshape(-1, xd.shape[-1]) @ A.t()  # (tokens, r)
        # in place: addmm into a fresh output would first copy the whole (tokens, out) base result into it
        y = base.reshape(-1, base.shape[-1]).addmm_(h, B.t(), alpha=scaling)
        ctx.save_for_backward(xd, h, weight, A, B)
        ctx.scaling, ctx.same_input, ctx.adapter_dtype = scaling, xd is x, lora_A.dtype
        return y.view(base.shape)

    @staticmethod
    def backward(ctx, grad):
        xd, h, weight, A, B = ctx.saved_tensors
        s, shape = ctx.scaling, grad.shape
        grad = grad.reshape(-1, shape[-1])  # (tokens, out)
        grad_h = grad @ B  # (tokens, r)
        grad_x = grad_xd = grad_A = grad_B = None
        if ctx.needs_input_grad[4]:
            grad_A = (grad_h.t() @ xd.reshape(-1, xd.shape[-1])).mul_(s).to(ctx.adapter_dtype)
        if ctx.needs_input_grad[5]:
            grad_B = (grad.t() @ h).mul_(s).to(ctx.adapter_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight  # (tokens, in)
            if ctx.same_input:  # both paths' input gradients, summed by addmm's accumulate
                grad_x.addmm_(grad_h, A, alpha=s)
            grad_x = grad_x.view(*shape[:-1], -1)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_xd = (grad_h @ A).mul_(s).view(*shape[:-1], -1)
        return grad_x, grad_xd, None, None, grad_A, grad_B, None


def lora_forward(self, x, *args, **kwargs):
    """forward of a peft lora.Linear through LoraLinearFunction where it computes what peft's would."""
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or adapter not in self.lora_A
            or adapter in self.lora_variant or self.lora_B[adapter].bias is not None
            or type(self.base_layer) is not torch.nn.Linear):
        from peft.tuners.lora import Linear

        return Linear.forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[adapter]
    xd = dropout(x) if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0 else x
    return LoraLinearFunction.apply(x, xd, self.base_layer.weight, self.base_layer.bias, self.lora_A[adapter].weight,
                                    self.lora_B[adapter].weight, self.scaling[adapter])


def fuse_lora_layers(model, fused=True):
    """Route every peft lora.Linear of `model` through lora_forward (fused=False: back to peft's); returns how many."""
    from peft.tuners.lora import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in layers:
        if fused:
            layer.forward = types.MethodType(lora_forward, layer)
        else:
            layer.__dict__.pop("forward", None)
    return len(layers)
