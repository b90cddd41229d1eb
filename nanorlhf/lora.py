"""peft's LoRA linear layer, forward and backward in one autograd function (issue 14).

peft computes y = base(x) + lora_B(lora_A(dropout(x))) * scaling as separate ops: the scaling multiplies and the
sum adds a (tokens, out_features) tensor, backward multiplies the gradient by the scaling at that width again and
adds the two input gradients at (tokens, in_features). Here the scaling goes into the rank-wide matmuls and the sums
into addmm's accumulate: the same terms, the adapter's in its own dtype (float32 next to a bfloat16 base, as peft's
autocast leaves it), without those passes over memory; the one difference, the two input gradients are summed in
the adapter's dtype (peft: in the input's). Saved for backward: dropout(x), in the input's dtype (peft keeps a
float32 copy under bfloat16), and x A^T. The dropout module and its masks are peft's. Layers peft does something
else with (a disabled or merged adapter, several active ones, DoRA and other variants, a bias on lora_B, a base
that is not nn.Linear) keep peft's own forward.
"""

import types

import torch


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (xd A^T) B^T, where xd = dropout(x) (the same tensor as x without dropout)."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_A, lora_B, scaling):
        base = torch.nn.functional.linear(x, weight, bias)  # (..., out)
        h = xd.to(lora_A.dtype).reshape(-1, xd.shape[-1]) @ lora_A.t()  # (tokens, r)
        # in place: addmm into a fresh output would first copy the whole (tokens, out) base result into it
        y = base.reshape(-1, base.shape[-1]).to(lora_A.dtype).addmm_(h, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(xd, h, weight, lora_A, lora_B)
        ctx.scaling, ctx.same_input = scaling, xd is x
        return y.to(base.dtype).view(base.shape)

    @staticmethod
    def backward(ctx, grad):
        xd, h, weight, lora_A, lora_B = ctx.saved_tensors
        s, shape = ctx.scaling, grad.shape
        grad = grad.reshape(-1, shape[-1])  # (tokens, out)
        grad_lora = grad.to(lora_A.dtype)
        grad_h = grad_lora @ lora_B  # (tokens, r)
        grad_x = grad_xd = grad_A = grad_B = None
        if ctx.needs_input_grad[4]:
            grad_A = (grad_h.t() @ xd.reshape(-1, xd.shape[-1]).to(lora_A.dtype)).mul_(s)
        if ctx.needs_input_grad[5]:
            grad_B = (grad_lora.t() @ h).mul_(s)
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight  # (tokens, in)
            if ctx.same_input:  # both paths' input gradients, summed in the adapter's dtype (peft: in the input's)
                grad_x = grad_x.to(lora_A.dtype).addmm_(grad_h, lora_A, alpha=s).to(grad.dtype)
            grad_x = grad_x.view(*shape[:-1], -1)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_xd = (grad_h @ lora_A).mul_(s).to(xd.dtype).view(*shape[:-1], -1)
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
