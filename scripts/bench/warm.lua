-- Walks users 1..100000 once per thread-share, to fill the status cache.
local key = os.getenv("KEY")
local counter = 0
local step = 1
local threads = {}
setup = function(thread)
  table.insert(threads, thread)
  thread:set("first", #threads)
end
init = function(args)
  counter = first
  step = 2
end
request = function()
  local id = counter
  counter = counter + step
  if id > 100000 then id = math.random(1, 100000) end
  return wrk.format("GET", "/v1/users/user" .. id .. "/integrations", { ["Authorization"] = "Bearer " .. key })
end
