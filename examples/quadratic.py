"""The seed article's worked example, L(theta) = (theta - 1)^2, with correct gradients.

    plait launch -n 2 examples/quadratic.py

The article started its two replicas at theta = 2 and theta = 3, wrote the gradient as
-2(theta - 1) (the sign is wrong: d/dtheta (theta - 1)^2 = 2(theta - 1)), and then let each replica
step on its own gradient, so the replicas ended at 2.2 and 3.4: moving *away* from the minimum at 1,
and apart from each other. Synchronous data parallelism does this instead:

    all replicas start equal (rank 0's theta is broadcast):    theta = 2 on every rank
    every rank computes its gradient, they are averaged:      g = (1/n) sum_i 2(theta - 1) = 2
    every rank applies the same update:                        theta <- 2 - 0.1 * 2 = 1.8

and theta falls towards 1 on every rank, identically. Each step prints theta, the gradient autograd
computed (after averaging), and the analytic 2(theta - 1) beside it.
"""

import torch

import plait


class Quadratic(torch.nn.Module):
    def __init__(self, start: float) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(start))

    def forward(self) -> torch.Tensor:
        return (self.theta - 1.0) ** 2


def main() -> None:
    ctx = plait.init()
    start = 2.0 + ctx.rank  # the article's 2 and 3; setup replaces every replica's with rank 0's
    model, optimizer = plait.setup(Quadratic(start), "ddp", lambda ps: plait.optim.SGD(ps, lr=0.1))
    for step in range(1, 11):
        optimizer.zero_grad()
        theta = model.theta.item()
        model().backward()
        grad = model.theta.grad.item()
        assert abs(grad - 2 * (theta - 1)) < 1e-6, (grad, theta)
        optimizer.step()
        print(
            f"step {step:2d} rank {ctx.rank}: theta = {theta:.6f}  grad = {grad:+.6f} "
            f"(2(theta-1) = {2 * (theta - 1):+.6f})  ->  theta = {model.theta.item():.6f}\n",
            end="",
            flush=True,
        )
    plait.shutdown(exit_code=0)


if __name__ == "__main__":
    main()
