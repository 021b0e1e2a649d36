// Launches that a captured CUDA graph runs only when they have work (csrc/graph_gate.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>

namespace mikv {

// Runs `launch(stream)`. While `stream` is capturing a CUDA graph, the launches go into the
// body of a conditional node that a one-CTA kernel opens at replay only if some of
// values[0, n) is nonzero; otherwise (not capturing, or no conditional nodes on this driver)
// they are launched as they are. For launches that change nothing when those values are all
// zero, so that skipping them is exact.
void launch_if_any_nonzero(const int32_t* values, int n, cudaStream_t stream,
                           const std::function<void(cudaStream_t)>& launch);

}  // namespace mikv
