//! Seccomp policies for the VMM, one per thread kind (event loop, vCPU, API), compiled to
//! BPF with seccompiler and installed before any guest code runs. Filled in by the
//! "Seccomp filters and the jailer" issue.
