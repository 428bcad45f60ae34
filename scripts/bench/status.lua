-- GET /v1/users/user<N>/integrations for random N in 1..100000, with the API key.
local key = os.getenv("KEY")
math.randomseed(os.time() + (tonumber(tostring({}):sub(8), 16) or 0))
request = function()
  local id = math.random(1, 100000)
  return wrk.format("GET", "/v1/users/user" .. id .. "/integrations", { ["Authorization"] = "Bearer " .. key })
end
