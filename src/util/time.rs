//! Timestamps as Kubernetes writes them (`metav1.Time`, `metav1.MicroTime`).
