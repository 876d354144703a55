"""The seed article's two-rank Linear(1, 1) example, done right.

    plait launch -n 2 examples/linear_two_ranks.py

What the article's code got wrong, and what this one does instead:
* it started one process of two (`init_processes(0, size, train)`): `plait launch` starts every rank
  through torchrun, and `plait.init()` reads each rank's place from the environment;
* it never synchronized gradients (each rank stepped on its own gradient, so the replicas drifted)
  and called `all_reduce` on rank 0 only, which deadlocks: every rank must join a collective.
  Here `plait.setup(..., strategy="ddp")` broadcasts rank 0's parameters at the start and averages
  the gradients of all ranks in every backward, so all replicas apply the same update;
* rank r took `data[r:r+1]`, leaving a sample unused: here the data set is split evenly.
  (Four points, 0..3, so two ranks get two each; y = x - 1 as in the article.)

Each step prints every rank's parameters: they are identical on all ranks, and approach the
solution w = 1, b = -1 of y = x - 1.
"""

import torch

import plait


def main() -> None:
    ctx = plait.init()
    torch.manual_seed(1234 + ctx.rank)  # different on purpose: setup makes the replicas equal
    model, optimizer = plait.setup(
        torch.nn.Linear(1, 1), strategy="ddp", optimizer=lambda ps: plait.optim.SGD(ps, lr=0.2)
    )
    data = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    target = data - 1.0
    per_rank = len(data) // ctx.world_size
    local = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)

    for step in range(40):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data[local]), target[local])
        loss.backward()  # gradients are averaged over all ranks here
        optimizer.step()
        w, b = model.weight.item(), model.bias.item()
        # one write per line, so the two ranks' lines never interleave mid-line
        print(
            f"step {step:2d} rank {ctx.rank}: w = {w:+.6f}  b = {b:+.6f}  local loss = {loss.item():.6f}\n",
            end="",
            flush=True,
        )

    # prove it: every rank's parameters equal rank 0's, bit for bit
    mine = torch.tensor([model.weight.item(), model.bias.item()])
    everyone = torch.zeros(ctx.world_size * 2)
    ctx.world.all_gather(everyone, mine)
    assert torch.equal(everyone.view(-1, 2), mine.expand(ctx.world_size, 2)), everyone
    if ctx.rank == 0:
        print(
            f"all {ctx.world_size} replicas identical: w = {mine[0]:+.6f}, b = {mine[1]:+.6f} (solution: w = 1, b = -1)"
        )
    plait.shutdown(exit_code=0)


if __name__ == "__main__":
    main()
