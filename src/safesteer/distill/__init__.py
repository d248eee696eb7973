"""Stage 3: localized on-policy distillation of the student from the steered teacher."""
