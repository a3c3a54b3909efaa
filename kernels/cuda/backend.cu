// The table through which the engine reaches the CUDA backend (see fl_cuda_backend_api in
// cuda_model.h): the one symbol the CPU library looks for, weakly.
#include "cuda/cuda_model.h"

extern "C" const fl_cuda_backend_api *fl_cuda_backend(void) {
    static const fl_cuda_backend_api api = {
        fl_cuda_device_probe, fl_cuda_mem_info,  fl_cuda_weights_new,       fl_cuda_weights_free,
        fl_cuda_model_new,    fl_cuda_model_free, fl_cuda_model_set_adapter, fl_cuda_model_forward,
    };
    return &api;
}
