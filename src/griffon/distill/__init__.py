"""Distillation: a pretrained transformer (the teacher) made into a Griffin or Hawk student, layer
for layer (:mod:`.student`), trained by griffon's trainer in two stages, attention transfer and
end-to-end distillation (:mod:`.objectives`); ``griffon distill`` runs them."""
