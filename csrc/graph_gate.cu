// Conditional launches inside captured CUDA graphs.
//
// Split decode's lo part (mikv_vllm/integration/attention/split_decode.py) runs in every layer
// of every decode step, and while nothing is demoted its table is empty: the decode kernel and
// its reduce then change nothing, yet launching them cost ~9-14 us a layer at batch 128 on an
// H100, ~2% of the step (benchmarks/results/2026-12-07-h100-all-hi-batch-128-profile/). A
// smaller grid did not help (benchmarks/results/2026-12-07-h100-one-wave-decode-grid/): the
// launches themselves must go. Under full CUDA graphs the host cannot branch per step, so the
// graph does: a one-CTA kernel reads the lengths and sets the handle of a conditional node
// whose body holds the launches. That costs ~5 us a layer itself, so callers use it only where
// the launches cost more (mikv_vllm/ops.py empty_gate_pays,
// benchmarks/results/2026-12-07-h100-graph-gate/). One gate kernel per step for every layer
// would be cheaper, but CUDA 13.0 refuses a second conditional node on one handle
// (cudaErrorInvalidValue; benchmarks/results/2026-12-07-h100-decode-heavy-step-profile/).
#include <torch/all.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "graph_gate.h"

namespace mikv {
namespace detail {

#if CUDART_VERSION >= 12040
constexpr int kGateThreads = 256;

__global__ void __launch_bounds__(kGateThreads)
set_if_any_nonzero_kernel(const int32_t* __restrict__ values, int n,
                          cudaGraphConditionalHandle handle) {
  int any = 0;
  for (int i = threadIdx.x; i < n; i += kGateThreads) any |= values[i] != 0;
  any = __syncthreads_or(any);
  if (threadIdx.x == 0) cudaGraphSetConditional(handle, any ? 1u : 0u);
}

// The stream the conditional bodies are captured on, one per device, made outside any capture
// in global mode's sense (stream creation is relaxed around it).
cudaStream_t body_stream(int device) {
  static cudaStream_t streams[64] = {};
  TORCH_CHECK(device >= 0 && device < 64, "mikv graph gate: device index ", device, " >= 64");
  if (streams[device] == nullptr) {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    const cudaError_t err = cudaStreamCreateWithFlags(&streams[device], cudaStreamNonBlocking);
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    C10_CUDA_CHECK(err);
  }
  return streams[device];
}
#endif

}  // namespace detail

void launch_if_any_nonzero(const int32_t* values, int n, cudaStream_t stream,
                           const std::function<void(cudaStream_t)>& launch) {
#if CUDART_VERSION >= 12040
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph));
  if (status != cudaStreamCaptureStatusActive) {
    launch(stream);
    return;
  }
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const cudaStream_t body_stream = detail::body_stream(device);
  cudaGraphConditionalHandle handle;
  if (cudaGraphConditionalHandleCreate(&handle, graph, 0, cudaGraphCondAssignDefault) !=
      cudaSuccess) {
    (void)cudaGetLastError();  // a driver without conditional nodes: launch unconditionally
    launch(stream);
    return;
  }
  detail::set_if_any_nonzero_kernel<<<1, detail::kGateThreads, 0, stream>>>(values, n, handle);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t num_deps = 0;
  C10_CUDA_CHECK(
      cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph, &deps, &edges, &num_deps));
  cudaGraphNodeParams params = {};
  params.type = cudaGraphNodeTypeConditional;
  params.conditional.handle = handle;
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = 1;
  cudaGraphNode_t node;
  C10_CUDA_CHECK(cudaGraphAddNode(&node, graph, deps, edges, num_deps, &params));
  C10_CUDA_CHECK(cudaStreamBeginCaptureToGraph(body_stream, params.conditional.phGraph_out[0],
                                               nullptr, nullptr, 0,
                                               cudaStreamCaptureModeRelaxed));
  cudaGraph_t body = nullptr;
  try {
    launch(body_stream);
  } catch (...) {
    (void)cudaStreamEndCapture(body_stream, &body);
    throw;
  }
  C10_CUDA_CHECK(cudaStreamEndCapture(body_stream, &body));
  // What the capturing stream launches next waits for the conditional node.
  C10_CUDA_CHECK(cudaStreamUpdateCaptureDependencies(stream, &node, nullptr, 1,
                                                     cudaStreamSetCaptureDependencies));
#else
  (void)values;
  (void)n;
  launch(stream);
#endif
}

}  // namespace mikv
