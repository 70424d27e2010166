// A batch-norm-shaped autograd op that does no work, for bench_bn.py --floor.
//
// Its forward allocates y (like x) and a float64 statistics buffer and saves
// x and the weight; its backward allocates dx, dweight and dbias. Everything
// runs in C++ (the dispatcher, the autograd node, the backward), so its time
// is the least any layer with fresh outputs pays per call through autograd,
// whatever language its kernels are written in.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct EmptyBatchNorm : public torch::autograd::Function<EmptyBatchNorm> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bias) {
        at::Tensor stats = at::empty({3 * x.size(1)}, x.options().dtype(at::kDouble));
        ctx->save_for_backward({x, weight, stats});
        return at::empty_like(x);
    }

    static variable_list backward(AutogradContext* ctx, variable_list) {
        const variable_list saved = ctx->get_saved_variables();
        return {at::empty_like(saved[0]), at::empty_like(saved[1]), at::empty_like(saved[1])};
    }
};

at::Tensor empty_batch_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
    return EmptyBatchNorm::apply(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY(bnlab_bench, m) {
    m.def("empty_batch_norm(Tensor x, Tensor weight, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnlab_bench, CompositeImplicitAutograd, m) {
    m.impl("empty_batch_norm", empty_batch_norm);
}
