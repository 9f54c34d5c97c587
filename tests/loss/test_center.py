"""CenterUpdate: the lazy EMA update of a teacher centre, and the old checkpoint format of the losses."""

import pickle

import pytest
import torch

from dinov2.loss import DINOLoss, iBOTPatchLoss
from dinov2.loss.center import CenterUpdate


def test_apply_is_the_ema_of_the_batch_mean_by_hand():
    ema = CenterUpdate(momentum=0.75)
    center = torch.tensor([[4.0, -8.0]])
    ema.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))  # mean row [2, 4]
    assert ema.pending
    torch.testing.assert_close(center, torch.tensor([[4.0, -8.0]]))  # nothing moves before apply
    ema.apply(center)
    # 0.75 * [4, -8] + 0.25 * [2, 4] = [3.5, -5]
    torch.testing.assert_close(center, torch.tensor([[3.5, -5.0]]))
    assert not ema.pending
    ema.apply(center)  # nothing pending: no change
    torch.testing.assert_close(center, torch.tensor([[3.5, -5.0]]))


def test_apply_fills_a_centre_of_any_shape_with_as_many_elements_in_place():
    ema = CenterUpdate(momentum=0.5)
    center = torch.zeros(1, 1, 3)
    storage = center.data_ptr()
    ema.update(torch.tensor([[2.0, 4.0, 6.0]], dtype=torch.float16))  # summed in float32
    ema.apply(center)
    torch.testing.assert_close(center, torch.tensor([[[1.0, 2.0, 3.0]]]))
    assert center.data_ptr() == storage and center.dtype == torch.float32


def test_discard_drops_the_pending_update():
    ema = CenterUpdate(momentum=0.0)
    center = torch.ones(1, 2)
    ema.update(torch.tensor([[float("nan"), 5.0]]))
    ema.discard()
    assert not ema.pending
    ema.apply(center)
    torch.testing.assert_close(center, torch.ones(1, 2))
    ema.discard()  # nothing pending: no-op
    ema.update(torch.tensor([[7.0, 5.0]]))  # a new update is accepted after a discard
    ema.apply(center)
    torch.testing.assert_close(center, torch.tensor([[7.0, 5.0]]))


def test_bad_inputs_raise_clear_errors_and_keep_the_pending_update():
    with pytest.raises(ValueError, match=r"center_momentum must be in \[0, 1\], got 1.5"):
        CenterUpdate(momentum=1.5)
    ema = CenterUpdate(momentum=0.5)
    with pytest.raises(ValueError, match=r"rows must be \[n >= 1, \.\.\.\], got shape \(0, 2\)"):
        ema.update(torch.zeros(0, 2))
    ema.update(torch.tensor([[2.0, 2.0]]))
    with pytest.raises(RuntimeError, match="already pending"):
        ema.update(torch.tensor([[9.0, 9.0]]))
    with pytest.raises(ValueError, match=r"center has shape \(1, 3\).*2 elements"):
        ema.apply(torch.zeros(1, 3))
    center = torch.zeros(1, 2)
    ema.discard()
    ema.apply(center)
    torch.testing.assert_close(center, torch.zeros(1, 2))


def test_losses_keep_their_centre_in_the_centre_update_across_steps():
    loss = DINOLoss(out_dim=2, center_momentum=0.5)
    assert loss.center_momentum == 0.5 and loss.center_update.momentum == 0.5
    loss.update_center(torch.tensor([[2.0, 0.0]]))
    loss.update_center(torch.tensor([[0.0, 4.0]]))  # applies the first before starting the second
    loss.apply_center_update()
    # c1 = 0.5 * [2, 0] = [1, 0]; c2 = 0.5 * [1, 0] + 0.5 * [0, 4] = [0.5, 2]
    torch.testing.assert_close(loss.center, torch.tensor([[0.5, 2.0]]))
    with pytest.raises(ValueError, match=r"teacher_output must be \[n, 2\]"):
        loss.update_center(torch.zeros(2, 3, 2))


def test_losses_load_a_state_dict_in_the_format_written_before_the_centre_update_existed():
    # What DINOLoss / iBOTPatchLoss state dicts held (and checkpoints store under "dino_loss." and
    # "ibot_patch_loss."): one buffer "center", [1, K] and [1, 1, K], nothing else.
    old_dino = {"center": torch.tensor([[0.5, -1.0, 2.0]])}
    old_ibot = {"center": torch.tensor([[[1.0, 0.0, -3.0, 4.0]]])}
    dino, ibot = DINOLoss(3), iBOTPatchLoss(4)
    assert {k: v.shape for k, v in dino.state_dict().items()} == {"center": (1, 3)}
    assert {k: v.shape for k, v in ibot.state_dict().items()} == {"center": (1, 1, 4)}
    dino.load_state_dict(old_dino, strict=True)
    ibot.load_state_dict(old_ibot, strict=True)
    # the loaded centre is the one the next update moves: 0.9 * old + 0.1 * batch mean
    dino.update_center(torch.tensor([[1.0, 1.0, 1.0]]))
    targets = dino.softmax_center_teacher(torch.zeros(1, 3), teacher_temp=1.0)
    expected_center = 0.9 * old_dino["center"] + 0.1
    torch.testing.assert_close(dino.center, expected_center)
    torch.testing.assert_close(targets, torch.softmax(-expected_center, dim=-1))
    ibot.update_center(torch.zeros(1, 2, 4))
    ibot.apply_center_update()
    torch.testing.assert_close(ibot.center, 0.9 * old_ibot["center"])
    with pytest.raises(RuntimeError, match="size mismatch for center"):
        DINOLoss(4).load_state_dict(old_dino)


def test_state_dict_holds_the_pending_update_of_both_losses():
    dino, ibot = DINOLoss(2), iBOTPatchLoss(2)
    dino.update_center(torch.tensor([[10.0, 0.0]]))
    ibot.update_center(torch.tensor([[[0.0, 10.0], [0.0, 30.0]]]))  # mean token [0, 20]
    torch.testing.assert_close(dino.state_dict()["center"], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(ibot.state_dict()["center"], torch.tensor([[[0.0, 2.0]]]))
    assert not dino.center_update.pending and not ibot.center_update.pending


def test_centre_follows_a_device_or_dtype_move_of_the_loss():
    loss = DINOLoss(2)
    loss.update_center(torch.tensor([[10.0, 20.0]]))
    loss.double()  # replaces the buffer tensor: the update must land in the new one
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 2.0]], dtype=torch.float64))


def test_a_loss_with_a_pending_update_pickles_with_it():
    loss = iBOTPatchLoss(2)
    loss.update_center(torch.tensor([[[4.0, 8.0]]]))
    restored = pickle.loads(pickle.dumps(loss))
    assert restored.center_update.pending
    restored.apply_center_update()
    torch.testing.assert_close(restored.center, torch.tensor([[[0.4, 0.8]]]))
