-- Latency SLOs for `flexllm serve` (flexllm.slo). Edit while the server runs: the file is
-- reloaded once it has stayed unchanged for a moment; a file with an error is reported
-- and the previous rules stay in force.
--
-- ttft: seconds from arrival to the first token; tpot: seconds per output token after it.
-- Absent or 0: no bound. A request gets one whole rule, the most specific that exists:
-- its tenant's (the API key or the X-Tenant header), else its adapter's, else the default.
-- The file runs without io, os or require; plain arithmetic is fine.
local ms = 0.001

return {
  default = { ttft = 1.0, tpot = 200 * ms },

  adapters = {
    ["math-lora"] = { ttft = 0.5, tpot = 100 * ms },
  },

  tenants = {
    ["team-a"] = { ttft = 2.0 }, -- batch jobs: only the first token is bounded
  },
}
