// The op schemas of torchprune, all in one place, one fragment per op family. Implementations are
// registered per dispatch key next to their kernels: CPU in csrc/cpu/*.cpp, CUDA in
// csrc/cuda/register_*.cpp, autograd in csrc/autograd/, autocast in csrc/autocast/. The fake kernels
// and typed wrappers are Python, one module per family in torchprune/ops/, which each fragment
// names with set_python_module.
#include <Python.h>
#include <torch/library.h>

// `import torchprune._C` only has to load this shared library: loading runs the static
// registrations below and in the kernel files. The Python module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                          // name
      "torchprune C++ ops (see torch.ops.torchprune)",  // doc
      -1,                                            // no per-interpreter state
      nullptr,                                       // no methods: ops go through torch.ops
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(torchprune, m) {
  // Fake (meta) kernels are registered from Python, in the module named here: torch checks that
  // each fake comes from its fragment's module, and names that module when a fake is missing.
  m.set_python_module("torchprune.ops.masked");

  // y = x @ where(mask, weight, 0)^T + bias, over any number of leading dims of x.
  m.def(
      "masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradients of masked_linear w.r.t. (x, weight, bias). An output whose output_mask entry is
  // false is not computed and comes back as an empty tensor of shape [0]. grad_weight is exactly
  // zero where mask is false.
  m.def(
      "masked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // 2-D convolution (cross-correlation, NCHW) with where(mask, weight, 0) as the weight.
  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor mask, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Same contract as masked_linear_backward.
  m.def(
      "masked_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

// The packed-sparse (CSR) ops.
TORCH_LIBRARY_FRAGMENT(torchprune, m) {
  m.set_python_module("torchprune.ops.csr");

  // Packed sparse weights (CSR; the format is described in csrc/common/csr.h). pack_csr keeps
  // the entries where mask is true, or the nonzeros of weight when mask is None.
  m.def("pack_csr(Tensor weight, Tensor? mask) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("unpack_csr(Tensor row_ptr, Tensor col_idx, Tensor values, int in_features) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Verifies every entry of a packed weight (ordered, in range); raises a clear error if not.
  m.def("check_csr(Tensor row_ptr, Tensor col_idx, Tensor values, int in_features) -> ()",
        {at::Tag::pt2_compliant_tag});

  // y = x @ W^T + bias with W packed as CSR [out_features, in_features], over any leading dims
  // of x. The compute ops trust the packed structure (see check_csr).
  m.def(
      "sparse_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, int in_features, "
      "Tensor? bias) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradients w.r.t. (x, values, bias); values gets the gradient of the stored entries only.
  // Unrequested outputs come back as empty [0] tensors, as for masked_linear_backward.
  m.def(
      "sparse_linear_backward(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, "
      "Tensor values, int in_features, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // groups=1 convolution with the weight [O, C, kh, kw] packed as CSR over [O, C*kh*kw].
  m.def(
      "sparse_conv2d(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, "
      "int[2] kernel_size, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sparse_conv2d_backward(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, "
      "Tensor values, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

// The block-sparse (BSR, R x 1 blocks) op; the format is described in csrc/common/bsr.h.
TORCH_LIBRARY_FRAGMENT(torchprune, m) {
  m.set_python_module("torchprune.ops.bsr");
  // y = x @ W^T + bias with W [out_features, in_features] packed in R x 1 blocks (values is
  // [blocks, R]), over any leading dims of x. Differentiable w.r.t. x, values and bias.
  m.def(
      "block_sparse_linear(Tensor x, Tensor block_ptr, Tensor col_idx, Tensor values, "
      "int in_features, Tensor? bias) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

// The N:8 op; the format is described in csrc/common/nm.h.
TORCH_LIBRARY_FRAGMENT(torchprune, m) {
  m.set_python_module("torchprune.ops.nm");
  // y = x @ W^T + bias with W [out_features, in_features] in the N:8 format (codes [out_features,
  // ceil(slots / 8)], values [out_features, slots]), over any leading dims of x. Differentiable
  // w.r.t. x, values and bias.
  m.def("nm_sparse_linear(Tensor x, Tensor codes, Tensor values, int in_features, Tensor? bias) "
        "-> Tensor",
        {at::Tag::pt2_compliant_tag});
}

// Structured pruning's slicing op.
TORCH_LIBRARY_FRAGMENT(torchprune, m) {
  m.set_python_module("torchprune.ops.compact");
  // out[i] = tensors[i].index_select(dims[i], indices[i]) for every i, in one call
  // (csrc/cpu/compact.cpp, csrc/cuda/compact.cu). Outputs are fresh contiguous tensors.
  m.def("compact(Tensor[] tensors, int[] dims, Tensor[] indices) -> Tensor[]",
        {at::Tag::pt2_compliant_tag});
}
