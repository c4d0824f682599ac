"""DINO's parts (METHODS.md B) against hand computations and DINO's own formulas written out independently:
the loss with centring and teacher temperature, the schedules, the head, clipping, EMA, collapse monitors, k-NN."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.ssl.updates import clip_per_parameter, ema_update
from engine.ssl.head import DINOHead, WeightNormLinear
from engine.ssl.knn import knn_accuracy
from engine.ssl.loss import DINOLoss, collapse_stats, collapse_warning
from engine.ssl.schedules import cosine_at, teacher_temp_at


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_loss_equals_a_hand_computation_on_tiny_tensors():
    """One image, K = 3, 2 global + 1 local view: the mean of the 4 (teacher view, other student view) CEs."""
    student = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [-0.3, 0.8, 0.0]]     # views g1, g2, l1
    teacher = [[2.0, 1.0, 0.0], [0.0, 0.5, 1.0]]                        # views g1, g2
    center = [0.1, -0.2, 0.05]
    s_temp, t_temp = 0.1, 0.04
    expected, pairs = 0.0, 0
    for t in range(2):
        q = _softmax([(teacher[t][k] - center[k]) / t_temp for k in range(3)])
        for s in range(3):
            if s == t:
                continue
            z = [v / s_temp for v in student[s]]
            log_p = [v - math.log(sum(math.exp(u) for u in z)) for v in z]
            expected += -sum(q[k] * log_p[k] for k in range(3))
            pairs += 1
    expected /= pairs
    loss_fn = DINOLoss(3, warmup_teacher_temp=t_temp, teacher_temp=0.07, warmup_teacher_temp_epochs=10)
    loss_fn.center.copy_(torch.tensor([center]))
    got = loss_fn(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64), epoch=0)
    assert pairs == 4
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("views,batch,k", [(10, 3, 7), (4, 5, 1024), (2, 1, 5)])
def test_loss_matches_dino_reference_formula(views, batch, k):
    """DINO's DINOLoss.forward written as in its repo (chunk, double loop, skip v == iq) on random logits."""
    g = torch.Generator().manual_seed(views * 100 + k)
    student = torch.randn(views * batch, k, generator=g, dtype=torch.float64)
    teacher = torch.randn(2 * batch, k, generator=g, dtype=torch.float64)
    center = torch.randn(1, k, generator=g, dtype=torch.float64) * 0.1
    epoch = 3
    temp = np.linspace(0.04, 0.07, 10)[epoch]
    student_out = (student / 0.1).chunk(views)
    teacher_out = F.softmax((teacher - center) / temp, dim=-1).chunk(2)
    total, n = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n += 1
    loss_fn = DINOLoss(k).double()
    loss_fn.center.copy_(center)
    assert loss_fn(student, teacher, epoch).item() == pytest.approx((total / n).item(), rel=1e-9)


def test_loss_gradient_flows_to_the_student_only():
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    DINOLoss(5)(student, teacher, 0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_center_update_is_the_ema_of_the_teacher_batch_mean():
    loss_fn = DINOLoss(4, center_momentum=0.9)
    loss_fn.center.fill_(1.0)
    teacher = torch.tensor([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]])
    loss_fn.update_center(teacher)
    expected = 0.9 * 1.0 + 0.1 * teacher.mean(0)
    assert torch.allclose(loss_fn.center[0], expected)


def _dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup=0.0):
    """DINO utils.cosine_scheduler, verbatim in numpy."""
    warmup = np.array([])
    warmup_iters = warmup_epochs * niter
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


@pytest.mark.parametrize("base,final,epochs,niter,warmup", [
    (5e-4, 1e-6, 7, 13, 3), (0.04, 0.4, 5, 11, 0), (0.996, 1.0, 9, 1, 0), (1e-4, 1e-6, 4, 3, 1), (2.0, 0.5, 3, 7, 2)])
def test_cosine_schedule_equals_dino_arrays_at_every_step(base, final, epochs, niter, warmup):
    ref = _dino_cosine_scheduler(base, final, epochs, niter, warmup)
    got = [cosine_at(i, epochs * niter, base, final, warmup * niter) for i in range(epochs * niter)]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


def test_momentum_starts_at_0996_and_ends_near_1_weight_decay_rises():
    total = 200
    assert cosine_at(0, total, 0.996, 1.0) == pytest.approx(0.996)
    assert 0.99999 < cosine_at(total - 1, total, 0.996, 1.0) <= 1.0
    wds = [cosine_at(i, total, 0.04, 0.4) for i in range(total)]
    assert wds[0] == pytest.approx(0.04) and all(a <= b + 1e-15 for a, b in zip(wds, wds[1:]))


@pytest.mark.parametrize("warmup_epochs,epochs", [(10, 30), (1, 4), (3, 3), (0, 2)])
def test_teacher_temperature_schedule_equals_dino_array(warmup_epochs, epochs):
    ref = np.concatenate((np.linspace(0.04, 0.07, warmup_epochs), np.ones(epochs - warmup_epochs) * 0.07))
    got = [teacher_temp_at(e, 0.04, 0.07, warmup_epochs) for e in range(epochs)]
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_head_shapes_names_and_normalised_last_layer():
    head = DINOHead(192, out_dim=1024, hidden_dim=512, bottleneck_dim=256)
    x = torch.randn(5, 192)
    assert head(x).shape == (5, 1024)
    names = dict(head.named_parameters())
    assert {"last_layer.weight_g", "last_layer.weight_v", "mlp.0.weight", "mlp.4.bias"} <= set(names)
    assert not names["last_layer.weight_g"].requires_grad           # norm_last_layer: g fixed at 1
    assert head.last_layer_parameters() == [names["last_layer.weight_v"]]
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(1024))
    # the bottleneck output is L2-normalised before the last layer: logits are bounded by the row norms
    assert head(x * 1000).abs().max() <= 1.0 + 1e-5
    free = DINOHead(16, out_dim=8, hidden_dim=4, bottleneck_dim=3, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad and len(free.last_layer_parameters()) == 2


def test_weight_norm_linear_equals_torch_weight_norm():
    layer = WeightNormLinear(7, 5, fix_norm=False)
    with torch.no_grad():
        layer.weight_g.copy_(torch.rand(5, 1) + 0.5)
    ref = torch.nn.Linear(7, 5, bias=False)
    ref = torch.nn.utils.parametrizations.weight_norm(ref)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(layer.weight_g)
        ref.parametrizations.weight.original1.copy_(layer.weight_v)
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x), ref(x))


def test_per_parameter_clipping_is_dinos():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])          # norm 5 -> scaled to 3
    b.grad = torch.tensor([0.3, 0.4])               # norm 0.5 -> untouched
    clip_per_parameter([a, b], 3.0)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * (3.0 / (5.0 + 1e-6)))
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))


def test_ema_update():
    student = torch.nn.Linear(3, 2)
    teacher = torch.nn.Linear(3, 2)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * t0[k] + 0.1 * student.state_dict()[k])


def test_collapse_monitors_and_warnings():
    uniform = torch.full((8, 16), 1 / 16)
    stats = {k: v.item() for k, v in collapse_stats(uniform, torch.zeros(1, 16)).items()}
    assert stats["teacher_entropy"] == pytest.approx(1.0) and stats["teacher_batch_entropy"] == pytest.approx(1.0)
    assert "uniform" in collapse_warning(stats)
    one_hot = F.one_hot(torch.full((8,), 3), 16).float()
    stats = {k: v.item() for k, v in collapse_stats(one_hot, torch.ones(1, 16)).items()}
    assert stats["teacher_batch_entropy"] < 1e-6 and stats["center_norm"] == pytest.approx(4.0)
    assert "one dimension" in collapse_warning(stats)
    healthy = F.one_hot(torch.arange(8), 16).float() * 0.9 + 0.1 / 16
    stats = {k: v.item() for k, v in collapse_stats(healthy, torch.zeros(1, 16)).items()}
    assert collapse_warning(stats) == ""


def _knn_reference(train_f, train_y, test_f, test_y, num_classes, k, t):
    correct = 0
    for q, y in zip(test_f, test_y):
        sims = [(float(q @ f), int(l)) for f, l in zip(train_f, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, l in sims[:k]:
            votes[l] += math.exp(s / t)
        correct += int(max(range(num_classes), key=lambda c: votes[c]) == int(y))
    return 100.0 * correct / len(test_y)


@pytest.mark.parametrize("n,m,d,classes,k", [(50, 17, 8, 3, 5), (31, 9, 5, 4, 20), (7, 3, 3, 2, 20)])
def test_knn_equals_a_per_query_loop(n, m, d, classes, k):
    g = torch.Generator().manual_seed(n)
    train = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    test = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    train_y = torch.randint(0, classes, (n,), generator=g)
    test_y = torch.randint(0, classes, (m,), generator=g)
    got = knn_accuracy(train, train_y, test, test_y, classes, k=k, temperature=0.07, chunk=4)
    assert got == pytest.approx(_knn_reference(train, train_y, test, test_y, classes, min(k, n), 0.07))


def test_knn_separates_clusters():
    centres = F.normalize(torch.eye(4, 16), dim=1)
    train_y = torch.arange(4).repeat(10)
    train = F.normalize(centres[train_y] + 0.05 * torch.randn(40, 16), dim=1)
    test_y = torch.arange(4).repeat(3)
    test = F.normalize(centres[test_y] + 0.05 * torch.randn(12, 16), dim=1)
    assert knn_accuracy(train, train_y, test, test_y, 4, k=5) == 100.0


def test_student_learns_the_teacher_targets_through_every_crop():
    """The gradient path of a pretraining step (multi-crop backbone -> head -> DINO loss): with the teacher fixed,
    30 AdamW steps on one batch of 2 global + 2 local views lower the loss well below its start, and every student
    parameter that the loss reaches gets a gradient."""
    from engine.config import config_from_dict
    from engine.pretrain import build_network

    cfg = config_from_dict({}, ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "ssl.out_dim=64",
                                "ssl.hidden_dim=32", "ssl.bottleneck_dim=16", "ssl.norm_last_layer=false"])
    torch.manual_seed(0)
    student, teacher = build_network(cfg, 0.0), build_network(cfg, 0.0)
    teacher.requires_grad_(False)
    crops = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32), torch.randn(6, 3, 16, 16),
             torch.randn(6, 3, 16, 16)]
    loss_fn = DINOLoss(64, warmup_teacher_temp_epochs=0, teacher_temp=0.04)
    with torch.no_grad():
        target = teacher(crops[:2])
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = loss_fn(student(crops), target, epoch=0)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
