/* CUDA kernels; pointers are device pointers, launches go on the given stream.
 * Each has a CPU reference in kernels/cpu that the tests compare against. */
#ifndef FL_CUDA_OPS_H
#define FL_CUDA_OPS_H

#ifdef __cplusplus
extern "C" {
#endif

/* Usable CUDA devices (0 when there is no driver or device). */
int fl_cuda_device_count(void);

/* y = x / rms(x) * w per row. Returns 0, or -1 on a launch error. */
int fl_cuda_rmsnorm_forward(float *y, const float *x, const float *w, int n, int dim, float eps,
                            void *stream); /* y,x [n,dim], w [dim] */

#ifdef __cplusplus
}
#endif
#endif
