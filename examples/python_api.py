"""The Python API in a minute: Tf-KD-reg and Tf-KD-self as timm training tasks (README's example, run by a test)."""
import timm
import torch

from timm_tfkd import (
    SelfDistillLoss, TfKDRegTask, TfKDSelfTask, VirtualTeacherLoss, create_self_teacher, effective_smoothing,
)

images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

# Tf-KD-reg: the student alone, regularized by the virtual teacher. A timm TrainingTask returns
# loss, output, task_loss (cross-entropy) and kd_loss (the KL term).
model = timm.create_model('test_resnet', num_classes=10)
task = TfKDRegTask(model, VirtualTeacherLoss(alpha=0.1, temperature=20.0, correct_prob=0.99, formula='paper'))
optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
result = task(images, labels)
result['loss'].backward()
optimizer.step()
print(f"reg: loss {result['loss']:.3f} = 0.9 * CE {result['task_loss']:.3f} + 0.1 * KL {result['kd_loss']:.3f}")

# Tf-KD-self: a frozen copy of the trained model (it stays trainable) teaches a fresh one of its architecture.
teacher = create_self_teacher(model)
student = timm.create_model('test_resnet', num_classes=10)
self_task = TfKDSelfTask(student, teacher, SelfDistillLoss(alpha=0.9, temperature=6.0))
print(f"self: kd_loss {self_task(images, labels)['kd_loss']:.3f}")

# The reference code's reg loss is label smoothing in disguise (README, "Paper and official formulas"):
equivalent = effective_smoothing(alpha=0.1, temperature=20.0, num_classes=100, multiplier=100.0)
print(f'official reg (ResNet-18 setting) = {equivalent.scale:.2f} x label smoothing {equivalent.smoothing:.3f}')
